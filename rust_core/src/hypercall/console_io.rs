//! HYPERVISOR_console_io: the hypervisor console (`xl dmesg`), which Linux
//! uses for earlyprintk=xen. Output goes to the host a piece at a time;
//! input comes from what the host queued.

use super::{Call, HcResult};
use crate::abi::{consoleio, errno, Width};
use crate::exit::ExitReason;

/// Bytes copied per step, so a huge count never means a huge host buffer.
const CHUNK: u64 = 4096;
/// Bytes written before a long write is continued (as Xen's
/// guest_console_write does when preempted): the host takes each piece
/// before the next, so a 4 GiB count never sits in a host buffer.
pub const WRITE_PER_CALL: u64 = 64 << 10;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, count, buf, ..] = args;
    // `count` is an unsigned int in the ABI.
    let count = count & 0xffff_ffff;
    match cmd {
        consoleio::WRITE => {
            let now = count.min(WRITE_PER_CALL);
            let mut done = 0u64;
            let mut chunk = vec![0u8; CHUNK.min(now) as usize];
            while done < now {
                let n = CHUNK.min(now - done) as usize;
                c.guest.read(buf.wrapping_add(done), &mut chunk[..n])?;
                c.dom.console_write(&chunk[..n]);
                done += n as u64;
            }
            if count > 0 {
                c.exit_with(ExitReason::ConsoleOutput);
            }
            if done < count {
                let rest = buf.wrapping_add(done);
                if c.width() == Width::Bits32 && rest >> 32 != 0 {
                    // The rest lies past a 32-bit caller's 4 GiB.
                    return Err(errno::EFAULT);
                }
                c.effects.restart = Some(vec![cmd, count - done, rest]);
            }
            Ok(0)
        }
        consoleio::READ => {
            let n = (count as usize).min(c.dom.console_in.len());
            let data: Vec<u8> = c.dom.console_in.iter().take(n).copied().collect();
            c.guest.write(buf, &data)?;
            c.dom.console_in.drain(..n);
            Ok(n as i64)
        }
        _ => Err(errno::ENOSYS),
    }
}
