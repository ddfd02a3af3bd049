//! HYPERVISOR_console_io: the hypervisor console (`xl dmesg`), which Linux
//! uses for earlyprintk=xen. Output is buffered for the host; input comes
//! from what the host queued.

use super::{Call, HcResult};
use crate::abi::{consoleio, errno};
use crate::exit::ExitReason;

/// Bytes copied per step, so a huge count never means a huge host buffer.
const CHUNK: u64 = 4096;

pub fn call(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, count, buf, ..] = args;
    // `count` is an unsigned int in the ABI.
    let count = count & 0xffff_ffff;
    match cmd {
        consoleio::WRITE => {
            let mut done = 0u64;
            let mut chunk = vec![0u8; CHUNK.min(count) as usize];
            while done < count {
                let n = CHUNK.min(count - done) as usize;
                c.guest.read(buf.wrapping_add(done), &mut chunk[..n])?;
                c.dom.console_write(&chunk[..n]);
                done += n as u64;
            }
            if count > 0 {
                c.exit_with(ExitReason::ConsoleOutput);
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
