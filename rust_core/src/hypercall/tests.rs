//! Every hypercall family against a real domain state and real vCPU
//! states (a Unicorn engine for their registers), with the guest's
//! arguments in guest RAM and paging off, so guest-linear is physical.

use std::sync::Arc;

use super::{console_io, dispatch, Call, Effects};
use crate::abi::{errno, hc, Width};
use crate::cpu::Cpu;
use crate::exit::ExitReason;
use crate::memory::GuestRam;
use crate::mmu::PagingState;
use crate::vcpu::{Activity, Area, Vcpu};
use crate::waker::Waker;
use crate::xen::evtchn::{PortState, VIRQ_CONSOLE, VIRQ_TIMER};
use crate::xen::{DomainState, SharedState};

const ARG: u64 = 0x1000; // where a test puts a hypercall's argument struct
const SHARED_INFO: u64 = 0x10000;

struct Fixture {
    cpu: Cpu,
    dom: DomainState,
    vcpus: Vec<Vcpu>,
    /// The ABI the next calls are made in.
    width: Width,
}

fn fixture(nr_vcpus: u32) -> Fixture {
    let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
    let cpu = Cpu::new(ram.clone(), 1, nr_vcpus).unwrap();
    let shared = Arc::new(SharedState::new(ram, 1, nr_vcpus, Waker::new().unwrap()));
    let dom = DomainState::new(1, [7; 16], shared, nr_vcpus);
    let vcpus = (0..nr_vcpus).map(|i| Vcpu::new(i, cpu.power_on_state().unwrap())).collect();
    Fixture { cpu, dom, vcpus, width: Width::Bits64 }
}

impl Fixture {
    fn call_as(&mut self, vcpu: u32, cpl: u8, nr: u64, args: &[u64]) -> (i64, Effects) {
        let ram = self.dom.ram.clone();
        let mut a = [0u64; 5];
        a[..args.len()].copy_from_slice(args);
        let paging_off = PagingState { cr0: 1, cr3: 0, cr4: 0, efer: 0 };
        let mut c = Call::new(&ram, paging_off, self.width, &mut self.dom, &mut self.vcpus, self.cpu.pristine(), vcpu, cpl);
        let rax = dispatch(&mut c, nr, a) as i64;
        (rax, c.effects)
    }

    fn call(&mut self, vcpu: u32, nr: u64, args: &[u64]) -> i64 {
        self.call_as(vcpu, 0, nr, args).0
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
        self.dom.ram.slice_mut(gpa, bytes.len() as u64).unwrap().copy_from_slice(bytes);
    }

    fn get(&self, gpa: u64, len: u64) -> Vec<u8> {
        self.dom.ram.slice(gpa, len).unwrap().to_vec()
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.get(gpa, 4).try_into().unwrap())
    }

    /// shared_info placed at SHARED_INFO (XENMEM_add_to_physmap).
    fn with_shared_info(mut self) -> Self {
        let mut a = Vec::new();
        a.extend(0x7ff0u16.to_le_bytes()); // DOMID_SELF
        a.extend(0u16.to_le_bytes());
        a.extend(0u32.to_le_bytes()); // XENMAPSPACE_shared_info
        a.extend(0u64.to_le_bytes()); // idx
        a.extend((SHARED_INFO >> 12).to_le_bytes());
        self.put(ARG, &a);
        assert_eq!(self.call(0, hc::MEMORY_OP, &[7, ARG]), 0);
        self
    }

    fn bind(&mut self, vcpu: u32, op: u64, args: &[u32]) -> Result<u32, i64> {
        let bytes: Vec<u8> = args.iter().chain([0u32].iter()).flat_map(|w| w.to_le_bytes()).collect();
        self.put(ARG, &bytes);
        match self.call(vcpu, hc::EVENT_CHANNEL_OP, &[op, ARG]) {
            0 => Ok(self.u32_at(ARG + 4 * args.len() as u64)),
            e => Err(-e),
        }
    }
}

const E: fn(i64) -> i64 = |e| -e;

#[test]
fn user_mode_and_unknown_hypercalls_are_refused() {
    let mut f = fixture(1);
    assert_eq!(f.call_as(0, 3, hc::XEN_VERSION, &[0]).0, E(errno::EPERM));
    assert_eq!(f.call(0, 60, &[1, 2, 3]), E(errno::ENOSYS));
    assert_eq!(f.call(0, hc::XEN_VERSION, &[0]), 0x40013);
    assert_eq!(f.dom.log.counts[hc::XEN_VERSION as usize], 2);
}

#[test]
fn xen_version_copies_out_or_faults() {
    let mut f = fixture(1);
    assert_eq!(f.call(0, hc::XEN_VERSION, &[1, ARG]), 0);
    assert_eq!(&f.get(ARG, 9), b".0-pvhvm\0");
    assert_eq!(f.call(0, hc::XEN_VERSION, &[1, 0xffff_f000]), E(errno::EFAULT));
    f.put(ARG, &1u32.to_le_bytes());
    assert_eq!(f.call(0, hc::XEN_VERSION, &[6, ARG]), E(errno::EINVAL), "feature submap 1 does not exist");
    assert_eq!(f.call(0, hc::XEN_VERSION, &[9, ARG]), 0, "Xen's command line is not a domU's: it reads <denied>");
    assert_eq!(&f.get(ARG, 9), b"<denied>\0");
    assert_eq!(f.call(0, hc::XEN_VERSION, &[10, 0]), E(errno::EPERM), "nor is its build id");
}

#[test]
fn console_io_writes_for_the_host_and_reads_its_input() {
    let mut f = fixture(1);
    f.put(ARG, b"hello");
    let (rax, fx) = f.call_as(0, 0, hc::CONSOLE_IO, &[0, 5, ARG]);
    assert_eq!((rax, fx.exit), (0, Some(ExitReason::ConsoleOutput)));
    assert_eq!(f.dom.console_out, b"hello");
    f.dom.console_in.extend(b"abc");
    assert_eq!(f.call(0, hc::CONSOLE_IO, &[1, 2, ARG + 0x100]), 2);
    assert_eq!(f.get(ARG + 0x100, 2), b"ab");
    assert_eq!(f.call(0, hc::CONSOLE_IO, &[0, 5, 0xffff_fff0]), E(errno::EFAULT));
    assert_eq!(f.call(0, hc::CONSOLE_IO, &[7, 0, 0]), E(errno::ENOSYS));
}

#[test]
fn console_io_continues_a_long_write_after_each_piece() {
    let mut f = fixture(1);
    let total = 2 * console_io::WRITE_PER_CALL + 100;
    let text: Vec<u8> = (0..total).map(|i| b'a' + (i % 26) as u8).collect();
    f.put(ARG, &text);
    let (mut count, mut buf, mut seen) = (total, ARG, Vec::new());
    for piece in 0.. {
        let (rax, fx) = f.call_as(0, 0, hc::CONSOLE_IO, &[0, count, buf]);
        assert_eq!((rax, fx.exit), (0, Some(ExitReason::ConsoleOutput)), "piece {piece}");
        let out = std::mem::take(&mut f.dom.console_out);
        assert!(out.len() as u64 <= console_io::WRITE_PER_CALL);
        seen.extend(out);
        match fx.restart.as_deref() {
            Some(&[cmd, c, b]) => {
                assert_eq!((cmd, c, b), (0, count - console_io::WRITE_PER_CALL, buf + console_io::WRITE_PER_CALL));
                (count, buf) = (c, b);
            }
            None => break,
            other => panic!("unexpected continuation {other:?}"),
        }
    }
    assert_eq!(seen, text, "every byte once, in order");
    // Should the host not take it, the buffer keeps the newest output.
    let cap = crate::xen::CONSOLE_OUT_CAP;
    f.dom.console_write(&vec![b'x'; cap - 3]);
    f.dom.console_write(b"0123456789");
    assert_eq!(f.dom.console_out.len(), cap);
    assert!(f.dom.console_out.ends_with(b"xxx0123456789"));
    f.dom.console_write(&vec![b'y'; cap + 1]);
    assert_eq!(f.dom.console_out, vec![b'y'; cap]);
}

#[test]
fn sched_op_shutdown_block_and_poll() {
    let mut f = fixture(2).with_shared_info();
    f.put(ARG, &9u32.to_le_bytes());
    assert_eq!(f.call(0, hc::SCHED_OP, &[2, ARG]), E(errno::EINVAL), "no SHUTDOWN_ reason 9");
    f.put(ARG, &3u32.to_le_bytes());
    let (rax, fx) = f.call_as(0, 0, hc::SCHED_OP, &[2, ARG]);
    assert_eq!((rax, fx.exit), (0, Some(ExitReason::Shutdown { reason: 3 })));
    assert_eq!(f.call(0, hc::SCHED_OP, &[4, ARG]), E(errno::ESRCH), "remote_shutdown of no domain 3");
    f.put(ARG, &1u16.to_le_bytes());
    assert_eq!(f.call(0, hc::SCHED_OP, &[4, ARG]), E(errno::EPERM), "remote_shutdown is the device model's");

    // Block with nothing pending: the vCPU blocks. With an upcall pending: it goes on.
    let (_, fx) = f.call_as(1, 0, hc::SCHED_OP, &[1, 0]);
    assert!(fx.block);
    assert_eq!(f.vcpus[1].activity, Activity::Blocked);
    let port = f.bind(0, 7, &[0]).unwrap(); // an IPI for vCPU 0
    f.dom.ports().unmask(&f.dom.ram, port);
    f.dom.ports().raise(&f.dom.ram, port);
    let (_, fx) = f.call_as(0, 0, hc::SCHED_OP, &[1, 0]);
    assert!(!fx.block);

    // Poll: too many ports, a port out of range, a pending port, a timeout.
    let poll = |f: &Fixture, nr: u32, timeout: u64| {
        let mut a = Vec::new();
        a.extend((ARG + 0x100).to_le_bytes());
        a.extend(nr.to_le_bytes());
        a.extend(0u32.to_le_bytes());
        a.extend(timeout.to_le_bytes());
        f.put(ARG, &a);
    };
    poll(&f, 129, 0);
    assert_eq!(f.call(1, hc::SCHED_OP, &[3, ARG]), E(errno::EINVAL));
    f.put(ARG + 0x100, &4096u32.to_le_bytes());
    poll(&f, 1, 0);
    assert_eq!(f.call(1, hc::SCHED_OP, &[3, ARG]), E(errno::EINVAL));
    f.put(ARG + 0x100, &port.to_le_bytes());
    let (rax, fx) = f.call_as(1, 0, hc::SCHED_OP, &[3, ARG]);
    assert_eq!((rax, fx.block), (0, false), "the port is pending already");
    let other = f.bind(0, 7, &[1]).unwrap();
    f.put(ARG + 0x100, &other.to_le_bytes());
    poll(&f, 1, 123_456);
    let (rax, fx) = f.call_as(1, 0, hc::SCHED_OP, &[3, ARG]);
    assert_eq!((rax, fx.block), (0, true));
    assert_eq!(f.vcpus[1].activity, Activity::Polling { ports: vec![other] });
    assert_eq!(f.vcpus[1].poll_deadline, Some(123_456));
    for (timeout, kept) in [(i64::MAX as u64, i64::MAX as u64), (1 << 63, 0), (u64::MAX, 0)] {
        poll(&f, 1, timeout);
        assert_eq!(f.call_as(1, 0, hc::SCHED_OP, &[3, ARG]).0, 0);
        assert_eq!(f.vcpus[1].poll_deadline, Some(kept), "timeout {timeout:#x}: negative for Xen, so past");
    }
    poll(&f, 1, 0);
    assert_eq!(f.call(1, hc::SCHED_OP, &[3, 0xffff_fff0]), E(errno::EFAULT));
}

#[test]
fn memory_op_places_shared_info_and_grant_frames() {
    let mut f = fixture(1);
    f.dom.memory_map = vec![(0, 0x9f000, 1), (0x100000, 0xf00000, 1)];
    let mut a = Vec::new();
    a.extend(5u32.to_le_bytes());
    a.extend(0u32.to_le_bytes());
    a.extend((ARG + 0x100).to_le_bytes());
    f.put(ARG, &a);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[9, ARG]), 0);
    assert_eq!(f.u32_at(ARG), 2, "nr_entries written back");
    assert_eq!(f.get(ARG + 0x100 + 20, 8), 0x100000u64.to_le_bytes());

    let physmap = |f: &Fixture, domid: u16, space: u32, idx: u64, gpfn: u64| {
        let mut a = Vec::new();
        a.extend(domid.to_le_bytes());
        a.extend(0u16.to_le_bytes());
        a.extend(space.to_le_bytes());
        a.extend(idx.to_le_bytes());
        a.extend(gpfn.to_le_bytes());
        f.put(ARG, &a);
    };
    physmap(&f, 5, 0, 0, 0x10);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[7, ARG]), E(errno::ESRCH), "another domain");
    physmap(&f, 0x7ff0, 0, 1, 0x10);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[7, ARG]), E(errno::EINVAL), "shared_info has one frame");
    physmap(&f, 0x7ff0, 0, 0, 0x10);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[7, ARG]), 0);
    assert_eq!(f.dom.ports().shared_info(), Some(0x10000));
    assert_eq!(f.get(0x10000 + 2048, 1024), [0; 1024], "ports start clear and unmasked, as on Xen");
    physmap(&f, 0x7ff0, 1, 0, 0x20);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[7, ARG]), 0);
    physmap(&f, 0x7ff0, 1, 64, 0x21);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[7, ARG]), E(errno::EINVAL), "past the grant frames");
    physmap(&f, 0x7ff0, 1, 1, 0x10_0000);
    let (rax, fx) = f.call_as(0, 0, hc::MEMORY_OP, &[7, ARG]);
    assert_eq!((rax, fx.remap), (0, true), "a frame outside RAM gets a host page mapped");
    assert_eq!(f.dom.grants().frames.len(), 2);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[63, ARG]), E(errno::ENOSYS));
}

#[test]
fn memory_op_places_nothing_beyond_the_p2m() {
    // Xen's p2m maps 48-bit guest-physical addresses: a frame from 2^36 on
    // is refused with -EINVAL (ept_set_entry), for every space, and nothing
    // is placed or mapped.
    let mut f = fixture(1);
    let physmap = |f: &Fixture, space: u32, idx: u64, gpfn: u64| {
        let mut a = Vec::new();
        a.extend(0x7ff0u16.to_le_bytes());
        a.extend(0u16.to_le_bytes());
        a.extend(space.to_le_bytes());
        a.extend(idx.to_le_bytes());
        a.extend(gpfn.to_le_bytes());
        f.put(ARG, &a);
    };
    for gpfn in [1u64 << 36, (1 << 40) - 1, (1 << 52) - 1, u64::MAX >> 12, u64::MAX] {
        for (space, idx) in [(0u32, 0u64), (1, 0), (1, 1 << 31)] {
            physmap(&f, space, idx, gpfn);
            let (rax, fx) = f.call_as(0, 0, hc::MEMORY_OP, &[7, ARG]);
            assert_eq!((rax, fx.remap), (E(errno::EINVAL), false), "space {space} at frame {gpfn:#x}");
        }
    }
    assert!(f.dom.grants().frames.iter().all(Option::is_none));
    assert!(f.dom.pending_remaps.is_empty());
    // The last frame below the limit is Xen's to place, and ours.
    physmap(&f, 1, 0, (1 << 36) - 1);
    let (rax, fx) = f.call_as(0, 0, hc::MEMORY_OP, &[7, ARG]);
    assert_eq!((rax, fx.remap), (0, true));
    assert_eq!(f.dom.grants().frames[0], Some(((1 << 36) - 1) << 12));
}

#[test]
fn hvm_op_params_and_upcall_vectors() {
    let mut f = fixture(2);
    let param = |f: &Fixture, index: u32, value: u64| {
        let mut a = Vec::new();
        a.extend(0x7ff0u16.to_le_bytes());
        a.extend(0u16.to_le_bytes());
        a.extend(index.to_le_bytes());
        a.extend(value.to_le_bytes());
        f.put(ARG, &a);
    };
    param(&f, 0, (2 << 56) | 0xf3);
    assert_eq!(f.call(0, hc::HVM_OP, &[0, ARG]), 0);
    assert_eq!(f.dom.callback_vector(), Some(0xf3));
    param(&f, 0, (1 << 56) | 5);
    assert_eq!(f.call(0, hc::HVM_OP, &[0, ARG]), E(errno::EINVAL), "only vector callbacks");
    param(&f, 1, 0);
    assert_eq!(f.call(0, hc::HVM_OP, &[0, ARG]), E(errno::EPERM), "STORE_PFN is the toolstack's");
    param(&f, 40, 0);
    assert_eq!(f.call(0, hc::HVM_OP, &[1, ARG]), E(errno::EINVAL));
    f.dom.hvm_params[2] = 9;
    param(&f, 2, 0);
    assert_eq!(f.call(0, hc::HVM_OP, &[1, ARG]), 0);
    assert_eq!(f.get(ARG + 8, 8), 9u64.to_le_bytes());
    f.put(ARG, &[1, 0, 0, 0, 0xe0]);
    assert_eq!(f.call(0, hc::HVM_OP, &[23, ARG]), 0);
    assert_eq!(f.vcpus[1].upcall_vector, Some(0xe0));
    f.put(ARG, &[2, 0, 0, 0, 0xe0]);
    assert_eq!(f.call(0, hc::HVM_OP, &[23, ARG]), E(errno::ENOENT));
    f.put(ARG, &0x7ff0u16.to_le_bytes());
    assert_eq!(f.call(0, hc::HVM_OP, &[9, ARG]), E(errno::EINVAL), "pagetable_dying: no shadow paging");
}

fn hvm_context_64(rip: u64, cr0: u64, efer: u64) -> Vec<u8> {
    let mut ctx = vec![0u8; 128];
    ctx[0..4].copy_from_slice(&1u32.to_le_bytes()); // VCPU_HVM_MODE_64B
    let regs = 8;
    ctx[regs + 4 * 8..regs + 5 * 8].copy_from_slice(&0x9000u64.to_le_bytes()); // rsp
    ctx[regs + 8 * 8..regs + 9 * 8].copy_from_slice(&rip.to_le_bytes());
    ctx[regs + 9 * 8..regs + 10 * 8].copy_from_slice(&2u64.to_le_bytes()); // rflags
    ctx[regs + 10 * 8..regs + 11 * 8].copy_from_slice(&cr0.to_le_bytes());
    ctx[regs + 11 * 8..regs + 12 * 8].copy_from_slice(&0x5000u64.to_le_bytes()); // cr3
    ctx[regs + 12 * 8..regs + 13 * 8].copy_from_slice(&0x20u64.to_le_bytes()); // cr4: PAE
    ctx[regs + 13 * 8..regs + 14 * 8].copy_from_slice(&efer.to_le_bytes());
    ctx
}

#[test]
fn vcpu_op_brings_a_vcpu_up_and_down() {
    let mut f = fixture(3);
    let (pe_pg, lme) = (0x8000_0001u64, 0x100u64);
    assert_eq!(f.call(0, hc::VCPU_OP, &[3, 3, 0]), E(errno::ENOENT));
    assert_eq!(f.call(0, hc::VCPU_OP, &[3, 1, 0]), 0, "vCPU 1 is down");
    assert_eq!(f.call(0, hc::VCPU_OP, &[1, 1, 0]), E(errno::EINVAL), "up before initialise");
    f.put(ARG, &hvm_context_64(0x40_0000, 0x1, lme));
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), E(errno::EINVAL), "64-bit mode needs paging");
    f.put(ARG, &hvm_context_64(0x40_0000, pe_pg, 0));
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), E(errno::EINVAL), "64-bit mode needs EFER.LME");
    let mut bad_mode = hvm_context_64(0x40_0000, pe_pg, lme);
    bad_mode[0] = 7;
    f.put(ARG, &bad_mode);
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), E(errno::EINVAL));
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, 0xffff_fff0]), E(errno::EFAULT));
    f.put(ARG, &hvm_context_64(0x8000_0000_0000, pe_pg, lme));
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), E(errno::EINVAL), "non-canonical RIP");
    let mut pad = hvm_context_64(0x40_0000, pe_pg, lme);
    pad[4] = 1;
    f.put(ARG, &pad);
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), E(errno::EINVAL), "pad must be 0");
    f.put(ARG, &hvm_context_64(0x40_0000, pe_pg, lme));
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), 0);
    let st = &f.vcpus[1].regs;
    assert_eq!((st.rip(), st.reg(4), st.cr(3)), (0x40_0000, 0x9000, 0x5000));
    assert!(st.in_64bit_code() && st.cpl() == 0);
    assert_eq!(st.efer() & 0x500, 0x500, "LME and LMA");
    assert_eq!(f.call(0, hc::VCPU_OP, &[3, 1, 0]), 0, "initialised, still down until VCPUOP_up");
    assert_eq!(f.call(0, hc::VCPU_OP, &[0, 1, ARG]), E(errno::EEXIST));
    let (rax, fx) = f.call_as(0, 0, hc::VCPU_OP, &[1, 1, 0]);
    assert!(rax == 0 && fx.woke_other);
    assert!(f.vcpus[1].is_running());
    assert_eq!(f.call(0, hc::VCPU_OP, &[1, 1, 0]), 0, "up again: nothing to do");
    assert_eq!(f.call(0, hc::VCPU_OP, &[3, 1, 0]), 1);
    let (_, fx) = f.call_as(1, 0, hc::VCPU_OP, &[2, 1, 0]);
    assert!(fx.block, "a vCPU that takes itself down stops at once");
    assert_eq!(f.call(0, hc::VCPU_OP, &[3, 1, 0]), 0);
    // The last vCPU up going down powers the domain off, as on Xen.
    let (rax, fx) = f.call_as(0, 0, hc::VCPU_OP, &[2, 0, 0]);
    assert_eq!((rax, fx.exit), (0, Some(ExitReason::Shutdown { reason: 0 })));
}

/// A 32-bit protected-mode context: flat code and data, a TSS.
fn hvm_context_32(cs_ar: u16, ss_ar: u16, tr_ar: u16, eip: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 128];
    let r = 8;
    let put32 = |ctx: &mut Vec<u8>, off: usize, v: u32| ctx[r + off..r + off + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut ctx, 32, eip);
    put32(&mut ctx, 36, 0x2);
    put32(&mut ctx, 40, 0x1); // CR0.PE
    for i in 0..4 {
        put32(&mut ctx, 84 + 4 * i, 0xfffff); // limits, page-granular
    }
    put32(&mut ctx, 100, 0x67);
    for (i, ar) in [cs_ar, 0xc93, ss_ar, 0xc93, tr_ar].iter().enumerate() {
        ctx[r + 104 + 2 * i..r + 106 + 2 * i].copy_from_slice(&ar.to_le_bytes());
    }
    ctx
}

#[test]
fn vcpu_op_initialise_checks_a_32_bit_context_as_xen_does() {
    let mut f = fixture(2);
    let try_ctx = |f: &mut Fixture, ctx: Vec<u8>| {
        f.put(ARG, &ctx);
        f.call(0, hc::VCPU_OP, &[0, 1, ARG])
    };
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc93, 0xc93, 0x8b, 0x1000)), E(errno::EINVAL), "CS must be code");
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc9b, 0xc9b, 0x8b, 0x1000)), E(errno::EINVAL), "SS must be writable data");
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc9b, 0xc93, 0x93, 0x1000)), E(errno::EINVAL), "TR must be a TSS");
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc9b, 0xcf3, 0x8b, 0x1000)), E(errno::EINVAL), "SS.DPL = CS.DPL");
    assert_eq!(try_ctx(&mut f, hvm_context_32(0x1c9b, 0xc93, 0x8b, 0x1000)), E(errno::EINVAL), "reserved bits");
    let mut byte_limit = hvm_context_32(0x49b, 0xc93, 0x8b, 0x20000);
    byte_limit[8 + 84..8 + 88].copy_from_slice(&0xffffu32.to_le_bytes());
    assert_eq!(try_ctx(&mut f, byte_limit), E(errno::EINVAL), "EIP past a byte-granular CS limit");
    // Xen takes only a busy 32-bit TSS for TR (hcfuzz's 32-bit bring-up found 0x8b refused).
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc9b, 0xc93, 0x89, 0x1234)), E(errno::EINVAL), "an available TSS");
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc9b, 0xc93, 0x0b, 0x1234)), E(errno::EINVAL), "a TSS not present");
    assert_eq!(try_ctx(&mut f, hvm_context_32(0xc9b, 0xc93, 0x8b, 0x1234)), 0, "a busy 32-bit TSS");
    let st = &f.vcpus[1].regs;
    assert_eq!(st.rip(), 0x1234);
    assert!(!st.in_64bit_code() && st.cr(0) & 1 == 1);
    assert_eq!(st.seg(crate::unicorn_gaps::R_CS).limit, 0xffff_ffff);
    assert_eq!(st.tr().flags >> 8 & 0xf, 0xb);
}

#[test]
fn vcpu_op_timers_and_registrations() {
    let mut f = fixture(2).with_shared_info();
    let now = f.dom.system_time_ns();
    let shot = |f: &Fixture, at: u64, flags: u32| {
        let mut a = at.to_le_bytes().to_vec();
        a.extend(flags.to_le_bytes());
        f.put(ARG, &a);
    };
    shot(&f, now + 1_000_000_000, 0);
    assert_eq!(f.call(1, hc::VCPU_OP, &[8, 0, ARG]), E(errno::EINVAL), "another vCPU's one-shot timer");
    let (rax, fx) = f.call_as(0, 0, hc::VCPU_OP, &[8, 0, ARG]);
    assert!(rax == 0 && fx.recheck);
    assert_eq!(f.vcpus[0].timers.singleshot_ns, Some(now + 1_000_000_000));
    shot(&f, 1, 1);
    assert_eq!(f.call(0, hc::VCPU_OP, &[8, 0, ARG]), 0, "Xen 4.18+ ignores VCPU_SSHOTTMR_future: fires at once");
    assert_eq!(f.vcpus[0].timers.singleshot_ns, Some(1));
    assert_eq!(f.call(0, hc::VCPU_OP, &[9, 0, 0]), 0);
    assert_eq!(f.vcpus[0].timers.singleshot_ns, None);
    f.put(ARG, &999_999u64.to_le_bytes());
    assert_eq!(f.call(0, hc::VCPU_OP, &[6, 1, ARG]), E(errno::EINVAL), "periods under 1 ms");
    // Past Xen's STIME_DELTA_MAX now + period wrapped: a deadline always
    // due, the timer firing on every look (hcfuzz's vCPU stalled for good).
    for period in [u64::MAX, (u64::MAX >> 2) + 1] {
        f.put(ARG, &period.to_le_bytes());
        assert_eq!(f.call(0, hc::VCPU_OP, &[6, 1, ARG]), E(errno::EINVAL), "period {period:#x}");
    }
    f.put(ARG, &(u64::MAX >> 2).to_le_bytes());
    assert_eq!(f.call(0, hc::VCPU_OP, &[6, 1, ARG]), 0, "the longest period Xen takes");
    let next = f.vcpus[1].timers.periodic.unwrap().next_ns;
    assert!(next > now && !f.vcpus[1].timers.fire(now + 1_000_000_000), "not due for a century");
    f.put(ARG, &4_000_000u64.to_le_bytes());
    assert_eq!(f.call(0, hc::VCPU_OP, &[6, 1, ARG]), 0);
    assert!(f.vcpus[1].timers.periodic.is_some());
    assert_eq!(f.call(0, hc::SET_TIMER_OP, &[now + 5]), 0);
    assert_eq!(f.vcpus[0].timers.singleshot_ns, Some(now + 5));

    // Far deadlines, as Xen takes them (s_time_t): 2^63-1 is kept, one with
    // bit 63 set is in the past; set_timer_op takes one over 2^50 ns ahead
    // or negative for a wrapped one and fires in 100 ms; periods stop at
    // STIME_DELTA_MAX.
    for (at, kept) in [(now + (1 << 52), now + (1 << 52)), (i64::MAX as u64, i64::MAX as u64), (1 << 63, 0), (u64::MAX, 0)] {
        shot(&f, at, 0);
        assert_eq!(f.call(0, hc::VCPU_OP, &[8, 0, ARG]), 0);
        assert_eq!(f.vcpus[0].timers.singleshot_ns, Some(kept), "one-shot at {at:#x}");
    }
    for at in [now + (1 << 51), i64::MAX as u64, u64::MAX] {
        let before = f.dom.system_time_ns();
        assert_eq!(f.call(0, hc::SET_TIMER_OP, &[at]), 0);
        let d = f.vcpus[0].timers.singleshot_ns.unwrap();
        assert!(d >= before + 100_000_000 && d <= f.dom.system_time_ns() + 100_000_000, "set_timer_op({at:#x}): {d}");
    }
    assert_eq!(f.call(0, hc::SET_TIMER_OP, &[now + (1 << 49)]), 0);
    assert_eq!(f.vcpus[0].timers.singleshot_ns, Some(now + (1 << 49)), "2^49 ns ahead is taken as it is");
    f.put(ARG, &(u64::MAX >> 2).to_le_bytes());
    assert_eq!(f.call(0, hc::VCPU_OP, &[6, 1, ARG]), 0);
    for period in [(u64::MAX >> 2) + 1, u64::MAX] {
        f.put(ARG, &period.to_le_bytes());
        assert_eq!(f.call(0, hc::VCPU_OP, &[6, 1, ARG]), E(errno::EINVAL), "period {period:#x}");
    }

    // vcpu_info: another vCPU's, aligned, once.
    let reg = |f: &Fixture, mfn: u64, offset: u32| {
        let mut a = mfn.to_le_bytes().to_vec();
        a.extend(offset.to_le_bytes());
        a.extend(0u32.to_le_bytes());
        f.put(ARG, &a);
    };
    reg(&f, 0x30, 4);
    assert_eq!(f.call(0, hc::VCPU_OP, &[10, 1, ARG]), E(errno::ENXIO), "misaligned");
    reg(&f, 0x30, 4064);
    assert_eq!(f.call(0, hc::VCPU_OP, &[10, 1, ARG]), E(errno::ENXIO), "crosses the page");
    reg(&f, 0x10_0000, 0x40);
    assert_eq!(f.call(0, hc::VCPU_OP, &[10, 1, ARG]), E(errno::EINVAL), "not RAM");
    reg(&f, 0x30, 0x40);
    let (rax, fx) = f.call_as(0, 0, hc::VCPU_OP, &[10, 1, ARG]);
    assert!(rax == 0 && fx.woke_other);
    assert_eq!(f.dom.ports().vcpu_info(1), Some(0x30040));
    assert_ne!(f.u32_at(0x30040 + 32), 0, "pvclock version written");
    assert_eq!(f.get(0x30040 + 8, 8), [0xff; 8], "every selector word flagged after the move");
    assert!(f.dom.ports().upcall_pending(&f.dom.ram, 1));
    assert_eq!(f.call(0, hc::VCPU_OP, &[10, 1, ARG]), E(errno::EBUSY), "only once");
    f.put(ARG, &0x7000u64.to_le_bytes());
    let (rax, fx) = f.call_as(0, 0, hc::VCPU_OP, &[5, 1, ARG]);
    assert!(rax == 0 && !fx.refresh_areas, "another vCPU's area is written when it runs");
    assert_eq!(f.vcpus[1].runstate_area, Some(Area::Virtual(0x7000)));
    f.put(ARG, &0x8ffcu64.to_le_bytes());
    assert_eq!(f.call(0, hc::VCPU_OP, &[14, 1, ARG]), E(errno::ENXIO), "a physical area must not cross a page");
    f.put(ARG, &0x8008u64.to_le_bytes());
    assert_eq!(f.call(0, hc::VCPU_OP, &[15, 1, ARG]), 0);
    assert_eq!(f.vcpus[1].time_area, Some(Area::Physical(0x8008)));
    assert_eq!(f.call(0, hc::VCPU_OP, &[4, 1, ARG]), 0);
    assert_eq!(f.u32_at(ARG), 3, "vCPU 1 is offline");
    assert_eq!(f.call(0, hc::VCPU_OP, &[11, 1, ARG]), E(errno::EINVAL), "send_nmi takes no argument");
    assert_eq!(f.call(0, hc::VCPU_OP, &[11, 1, 0]), 0);
    assert!(f.vcpus[1].nmi_pending);
    assert_eq!(f.call(0, hc::VCPU_OP, &[12, 0, ARG]), E(errno::EINVAL), "get_physid is the hardware domain's");
    assert_eq!(f.call(0, hc::VCPU_OP, &[16, 0, 0]), E(errno::ENOSYS));
}

#[test]
fn event_channels_across_vcpus() {
    let mut f = fixture(3).with_shared_info();
    // Per-vCPU VIRQs on any vCPU, global ones only on vCPU 0, once each.
    let timer1 = f.bind(0, 1, &[VIRQ_TIMER, 1]).unwrap();
    assert_eq!(f.bind(0, 1, &[VIRQ_TIMER, 1]), Err(errno::EEXIST));
    assert_eq!(f.bind(0, 1, &[VIRQ_CONSOLE, 1]), Err(errno::EINVAL));
    assert_eq!(f.bind(0, 1, &[VIRQ_TIMER, 3]), Err(errno::ENOENT));
    assert_eq!(f.bind(0, 1, &[24, 0]), Err(errno::EINVAL));
    assert_eq!(f.dom.ports().get(timer1).map(|p| (p.state, p.vcpu)), Some((PortState::Virq(VIRQ_TIMER), 1)));
    // An IPI for vCPU 2, sent by vCPU 0: the selector and upcall flag of vCPU 2.
    let ipi2 = f.bind(2, 7, &[2]).unwrap();
    assert_eq!(f.bind(0, 7, &[3]), Err(errno::ENOENT));
    f.put(ARG, &ipi2.to_le_bytes());
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[9, ARG]), 0); // unmask
    let (rax, fx) = f.call_as(0, 0, hc::EVENT_CHANNEL_OP, &[4, ARG]);
    assert!(rax == 0 && fx.woke_other && !fx.recheck);
    assert!(f.dom.ports().upcall_pending(&f.dom.ram, 2));
    assert!(!f.dom.ports().upcall_pending(&f.dom.ram, 0));
    // IPIs and per-vCPU VIRQs cannot move; an unbound port can.
    let bind_vcpu = |f: &mut Fixture, port: u32, vcpu: u32| {
        f.put(ARG, &[port.to_le_bytes(), vcpu.to_le_bytes()].concat());
        f.call(0, hc::EVENT_CHANNEL_OP, &[8, ARG])
    };
    assert_eq!(bind_vcpu(&mut f, ipi2, 1), E(errno::EINVAL));
    assert_eq!(bind_vcpu(&mut f, timer1, 0), E(errno::EINVAL));
    let mut a = 0x7ff0u16.to_le_bytes().to_vec();
    a.extend(0x7ff0u16.to_le_bytes());
    a.extend(0u32.to_le_bytes());
    f.put(ARG, &a);
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[6, ARG]), 0);
    let unbound = f.u32_at(ARG + 4);
    assert_eq!(bind_vcpu(&mut f, unbound, 2), 0);
    assert_eq!(bind_vcpu(&mut f, unbound, 9), E(errno::ENOENT));
    assert_eq!(bind_vcpu(&mut f, 999, 0), E(errno::EINVAL));
    // Status of a closed port and of the IPI; close; a send to nothing.
    let mut st = 0x7ff0u16.to_le_bytes().to_vec();
    st.extend([0, 0]);
    st.extend(ipi2.to_le_bytes());
    f.put(ARG, &st);
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[5, ARG]), 0);
    assert_eq!((f.u32_at(ARG + 8), f.u32_at(ARG + 12)), (5, 2), "EVTCHNSTAT_ipi on vCPU 2");
    f.put(ARG, &ipi2.to_le_bytes());
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[3, ARG]), 0);
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[3, ARG]), E(errno::EINVAL));
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[4, ARG]), E(errno::EINVAL));
}

#[test]
fn fifo_event_channels_through_the_hypercalls() {
    const CB: u64 = 0x40000;
    const ARRAY: u64 = 0x41000;
    let mut f = fixture(2).with_shared_info();
    let evtchn = |f: &mut Fixture, op: u64, body: &[u8]| {
        f.put(ARG, body);
        f.call(0, hc::EVENT_CHANNEL_OP, &[op, ARG])
    };
    let init = |gfn: u64, offset: u32, vcpu: u32| {
        [&gfn.to_le_bytes()[..], &offset.to_le_bytes(), &vcpu.to_le_bytes(), &[0u8; 8]].concat()
    };
    let pair = |a: u32, b: u32| [a.to_le_bytes(), b.to_le_bytes()].concat();
    let ipi = f.bind(0, 7, &[1]).unwrap();
    assert_eq!(evtchn(&mut f, 13, &pair(ipi, 1)), E(errno::ENOSYS), "set_priority under 2-level");
    assert_eq!(evtchn(&mut f, 12, &(ARRAY >> 12).to_le_bytes()), E(errno::EOPNOTSUPP));
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 0, 2)), E(errno::ENOENT));
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 4096 - 64, 0)), E(errno::EINVAL), "crosses the page");
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 6, 0)), E(errno::ENXIO));
    assert_eq!(evtchn(&mut f, 11, &init(0xfff_ffff, 0, 0)), E(errno::EINVAL), "not RAM");
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 0, 0)), 0);
    assert_eq!(f.get(ARG + 16, 1), [17], "link_bits");
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 0, 0)), E(errno::EINVAL), "vCPU 0 has one");
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 0x100, 1)), 0);
    assert_eq!(evtchn(&mut f, 12, &(ARRAY >> 12).to_le_bytes()), 0);
    assert_eq!(evtchn(&mut f, 13, &pair(ipi, 16)), E(errno::EINVAL));
    assert_eq!(evtchn(&mut f, 13, &pair(9999, 1)), E(errno::EINVAL));
    assert_eq!(evtchn(&mut f, 13, &pair(ipi, 1)), 0);
    // A send queues the IPI on vCPU 1's priority-1 queue and wakes it.
    f.put(ARG, &ipi.to_le_bytes());
    let (rax, fx) = f.call_as(0, 0, hc::EVENT_CHANNEL_OP, &[4, ARG]);
    assert!(rax == 0 && fx.woke_other);
    assert_eq!(f.u32_at(ARRAY + 4 * ipi as u64), 0xa000_0000, "PENDING | LINKED");
    assert_eq!((f.u32_at(CB + 0x100), f.u32_at(CB + 0x100 + 8 + 4)), (1 << 1, ipi), "READY, HEAD[1]");
    assert!(f.dom.ports().upcall_pending(&f.dom.ram, 1));
    // Ports past the 2-level limit are valid names now: status and poll.
    let st = [&0x7ff0u16.to_le_bytes()[..], &[0, 0], &5000u32.to_le_bytes()].concat();
    assert_eq!(evtchn(&mut f, 5, &st), 0);
    assert_eq!(f.u32_at(ARG + 8), 0, "EVTCHNSTAT_closed");
    f.put(ARG + 0x100, &5000u32.to_le_bytes());
    let poll = [(ARG + 0x100).to_le_bytes(), 1u64.to_le_bytes(), 0u64.to_le_bytes()].concat();
    f.put(ARG, &poll);
    assert_eq!(f.call(0, hc::SCHED_OP, &[3, ARG]), 0);
    // Reset closes every port and goes back to 2-level; FIFO may start again.
    assert_eq!(evtchn(&mut f, 10, &0x7ff0u16.to_le_bytes()), 0);
    assert!(f.dom.ports().get(ipi).is_none() && !f.dom.ports().fifo_active());
    assert_eq!(evtchn(&mut f, 10, &5u16.to_le_bytes()), E(errno::ESRCH));
    assert_eq!(evtchn(&mut f, 11, &init(CB >> 12, 0, 0)), 0);
}

#[test]
fn grant_table_op_versions_and_sizes() {
    let mut f = fixture(1);
    assert_eq!(f.call(0, hc::GRANT_TABLE_OP, &[6, ARG, 2]), E(errno::EINVAL), "count must be 1");
    f.put(ARG, &0x7ff0u16.to_le_bytes());
    assert_eq!(f.call(0, hc::GRANT_TABLE_OP, &[6, ARG, 1]), 0);
    assert_eq!((f.u32_at(ARG + 4), f.u32_at(ARG + 8)), (1, 64));
    f.put(ARG, &3u32.to_le_bytes());
    assert_eq!(f.call(0, hc::GRANT_TABLE_OP, &[8, ARG, 1]), E(errno::EINVAL));
    f.put(ARG, &2u32.to_le_bytes());
    assert_eq!(f.call(0, hc::GRANT_TABLE_OP, &[8, ARG, 1]), 0);
    f.put(ARG, &0x7ff0u32.to_le_bytes());
    assert_eq!(f.call(0, hc::GRANT_TABLE_OP, &[10, ARG, 1]), 0);
    assert_eq!(f.u32_at(ARG + 4), 2);
    assert_eq!(f.call(0, hc::GRANT_TABLE_OP, &[0, ARG, 1]), E(errno::ENOSYS), "map is a backend's");
}

#[test]
fn vm_assist_allows_only_the_runstate_update_flag() {
    let mut f = fixture(1);
    assert_eq!(f.call(0, hc::VM_ASSIST, &[0, 5]), 0);
    assert_eq!(f.dom.vm_assist, 1 << 5);
    assert_eq!(f.call(0, hc::VM_ASSIST, &[0, 1]), E(errno::EINVAL));
    assert_eq!(f.call(0, hc::VM_ASSIST, &[1, 5]), 0);
    assert_eq!(f.dom.vm_assist, 0);
}

#[test]
fn a_32_bit_caller_gets_the_compat_layouts() {
    let mut f = fixture(2);
    f.width = Width::Bits32;
    // struct compat xen_add_to_physmap { domid; size; space; idx (4); gpfn (4) }: 16 bytes.
    let mut a = Vec::new();
    a.extend(0x7ff0u16.to_le_bytes());
    a.extend(0u16.to_le_bytes());
    a.extend(0u32.to_le_bytes());
    a.extend(0u32.to_le_bytes());
    a.extend(((SHARED_INFO >> 12) as u32).to_le_bytes());
    f.put(ARG, &a);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[7, ARG]), 0);
    assert_eq!(f.dom.shinfo_width(), Width::Bits32, "latched from the caller's mode");
    // A cleared page, as on Xen.
    assert_eq!(f.get(SHARED_INFO + 2048, 256), vec![0; 256]);
    assert_eq!(f.get(SHARED_INFO + 2304, 4), vec![2, 0, 0, 0], "wc_version right after the masks, even");
    assert_eq!(f.dom.ports().max_ports(), 1024);

    // Port 33 on vCPU 1: pending word 1 bit 1, selector (u32 at 4) bit 1.
    for _ in 0..33 {
        f.dom.ports().alloc(PortState::Ipi, 1).unwrap();
    }
    f.put(SHARED_INFO + 2176 + 4, &0u32.to_le_bytes()); // unmask ports 32..63
    assert_eq!(f.dom.ports().raise(&f.dom.ram, 33), Some(1));
    let vi1 = SHARED_INFO + 64;
    assert_eq!(f.u32_at(SHARED_INFO + 2048 + 4), 0b10);
    assert_eq!(f.u32_at(vi1 + 4), 0b10);
    assert_eq!(f.get(vi1 + 8, 4), vec![0; 4], "nothing written where a 64-bit selector would be");
    assert_eq!(f.get(vi1, 1), vec![1]);
    // Ports past 1024 do not exist.
    f.put(ARG, &0x7ff0u32.to_le_bytes());
    f.put(ARG + 4, &2000u32.to_le_bytes());
    assert_eq!(f.call(0, hc::EVENT_CHANNEL_OP, &[5, ARG]), E(errno::EINVAL), "status of port 2000");

    // struct compat xen_memory_map { unsigned int nr_entries; handle (4) }.
    f.dom.memory_map = vec![(0, 0x9f000, 1), (0x100000, 0xf00000, 1)];
    f.put(ARG, &8u32.to_le_bytes());
    f.put(ARG + 4, &0x3000u32.to_le_bytes());
    assert_eq!(f.call(0, hc::MEMORY_OP, &[9, ARG]), 0);
    assert_eq!(f.u32_at(ARG), 2);
    assert_eq!(f.get(0x3000 + 20, 8), 0x100000u64.to_le_bytes());

    // struct compat sched_poll { handle (4); nr_ports; uint64_t timeout at 8 }.
    f.put(0x3100, &33u32.to_le_bytes());
    f.put(ARG, &0x3100u32.to_le_bytes());
    f.put(ARG + 4, &1u32.to_le_bytes());
    f.put(ARG + 8, &0u64.to_le_bytes());
    let (rax, fx) = f.call_as(1, 0, hc::SCHED_OP, &[3, ARG]);
    assert_eq!((rax, fx.block), (0, false), "port 33 is pending: poll returns at once");

    // The runstate area: 44 bytes, state_entry_time at 4.
    f.put(ARG + 44, &[0xee; 4]);
    assert_eq!(f.call(0, hc::VCPU_OP, &[4 /* get_runstate_info */, 0, ARG]), 0);
    let v = f.get(ARG, 48);
    assert_eq!(u64::from_le_bytes(v[4..12].try_into().unwrap()), f.vcpus[0].runstate.entry_ns);
    assert_eq!(v[44..], [0xee; 4], "nothing written past 44 bytes");

    // set_timer_op(lo, hi): the 64-bit deadline in two arguments.
    assert_eq!(f.call(0, hc::SET_TIMER_OP, &[0x2345_6789, 0x1]), 0);
    assert_eq!(f.vcpus[0].timers.singleshot_ns, Some(0x1_2345_6789));

    // A 32-bit pointer cannot run past 4 GiB.
    assert_eq!(f.call(0, hc::XEN_VERSION, &[1, 0xffff_fff8]), E(errno::EFAULT));
}

/// struct xen_memory_reservation at ARG (64-bit layout) with its extents at `list`.
fn reservation(f: &Fixture, list: u64, extents: &[u64], order: u32, domid: u16) {
    let mut a = Vec::new();
    a.extend(list.to_le_bytes());
    a.extend((extents.len() as u64).to_le_bytes());
    a.extend(order.to_le_bytes());
    a.extend(0u32.to_le_bytes());
    a.extend(domid.to_le_bytes());
    f.put(ARG, &a);
    let bytes: Vec<u8> = extents.iter().flat_map(|e| e.to_le_bytes()).collect();
    f.put(list, &bytes);
}

#[test]
fn reservation_ops_give_pages_back_and_take_them_again() {
    let mut f = fixture(1);
    let total = (16 << 20) / 4096;
    let self_id = 0x7ff0u16;
    f.put(ARG, &self_id.to_le_bytes());
    assert_eq!(f.call(0, hc::MEMORY_OP, &[3, ARG]), total, "current_reservation");
    assert_eq!(f.call(0, hc::MEMORY_OP, &[4, ARG]), total, "maximum_reservation");
    assert_eq!(f.call(0, hc::MEMORY_OP, &[14, ARG]), total - 1, "maximum_gpfn");

    // Give back 0x400 and the order-1 extent at 0x402..0x403; 0x400 again stops the call.
    f.put(0x400 * 4096, b"guest data");
    reservation(&f, 0x3000, &[0x400, 0x402, 0x400, 0x500], 0, self_id);
    let rax = f.call(0, hc::MEMORY_OP, &[1, ARG]);
    assert_eq!(rax, 2, "two extents done: the third names a page already given back");
    assert!(f.dom.ram.is_given_back(0x400 * 4096) && !f.dom.ram.is_ram(0x400 * 4096, 1));
    assert_eq!(f.dom.ram.given_back_pages(), 2);
    f.put(ARG + 0x100, &self_id.to_le_bytes());
    assert_eq!(f.call(0, hc::MEMORY_OP, &[3, ARG + 0x100]), total - 2);
    // A hypercall buffer in a given-back page faults.
    assert_eq!(f.call(0, hc::XEN_VERSION, &[1, 0x400 * 4096 + 8]), E(errno::EFAULT));
    // Orders past 9, other domains, address bits <= 12: nothing done.
    reservation(&f, 0x3000, &[0x600], 10, self_id);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[1, ARG]), 0);
    reservation(&f, 0x3000, &[0x600], 0, 5);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[1, ARG]), 0);
    // Populate back: zeroed, mapped again; a misaligned order-1 extent stops.
    reservation(&f, 0x3000, &[0x400, 0x401], 0, self_id);
    f.put(0x401 * 4096, b"x");
    assert_eq!(f.call(0, hc::MEMORY_OP, &[6, ARG]), 2, "0x401 was never given back: a fresh page there");
    assert_eq!(f.get(0x401 * 4096, 1), vec![0]);
    assert_eq!(f.get(0x400 * 4096, 10), vec![0; 10], "a populated page reads as zeros");
    reservation(&f, 0x3000, &[0x403], 1, self_id);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[6, ARG]), 0, "order-1 extents are aligned");
    // Frames in the MMIO hole cannot be populated; frames above RAM get
    // pages of their own, and maximum_gpfn follows them.
    reservation(&f, 0x3000, &[0xf_0000], 0, self_id);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[6, ARG]), 0);
    f.dom.max_pages += 1;
    reservation(&f, 0x3000, &[0x10_0000], 0, self_id);
    let (rax, fx) = f.call_as(0, 0, hc::MEMORY_OP, &[6, ARG]);
    assert_eq!((rax, fx.remap), (1, true));
    f.put(ARG + 0x100, &self_id.to_le_bytes());
    assert_eq!(f.call(0, hc::MEMORY_OP, &[14, ARG + 0x100]), 0x10_0000, "maximum_gpfn");
    assert_eq!(f.call(0, hc::MEMORY_OP, &[1, ARG]), 1, "and given back");
    assert_eq!(f.call(0, hc::MEMORY_OP, &[14, ARG + 0x100]), total - 1);
    f.dom.max_pages -= 1;
    // Only the hardware domain may insist on a NUMA node.
    reservation(&f, 0x3000, &[0x402], 0, self_id);
    f.put(ARG + 20, &(1u32 << 17 | 1 << 8).to_le_bytes()); // XENMEMF_exact_node(0)
    assert_eq!(f.call(0, hc::MEMORY_OP, &[6, ARG]), 0);
    // The domain's limit: at max_pages nothing more is populated.
    f.dom.max_pages = total as u64 - 1;
    reservation(&f, 0x3000, &[0x402], 0, self_id);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[6, ARG]), 0, "0x403 still out: one page would pass the limit");
    f.dom.max_pages = total as u64;
    reservation(&f, 0x3000, &[0x402], 1, self_id);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[6, ARG]), 1);

    // A long call is continued: the done count rides in the command.
    // (Populating a populated page again succeeds every time.)
    reservation(&f, 0x20000, &[0x900; 5000], 0, self_id);
    let (rax, fx) = f.call_as(0, 0, hc::MEMORY_OP, &[6, ARG]);
    assert_eq!(rax, 4096);
    assert_eq!(fx.restart, Some(vec![6 | 4096 << 6]));
    let (rax, fx) = f.call_as(0, 0, hc::MEMORY_OP, &[6 | 4096 << 6, ARG]);
    assert_eq!((rax, fx.restart), (5000, None));
}

#[test]
fn memory_exchange_checks_sizes_and_trades_pages() {
    let mut f = fixture(1);
    let self_id = 0x7ff0u16;
    let res = |list: u64, n: u64, order: u32| {
        let mut a = Vec::new();
        a.extend(list.to_le_bytes());
        a.extend(n.to_le_bytes());
        a.extend(order.to_le_bytes());
        a.extend(0u32.to_le_bytes());
        a.extend(self_id.to_le_bytes());
        a.resize(32, 0);
        a
    };
    let exch = |f: &Fixture, input: Vec<u8>, output: Vec<u8>, done: u64| {
        f.put(ARG, &[input, output, done.to_le_bytes().to_vec()].concat());
    };
    // Two order-0 pages (0x500, 0x501) for one order-1 extent at 0x600.
    f.put(0x3000, &[0x500u64.to_le_bytes(), 0x501u64.to_le_bytes()].concat());
    f.put(0x3100, &0x600u64.to_le_bytes());
    f.put(0x600 * 4096, b"old");
    exch(&f, res(0x3000, 2, 0), res(0x3100, 1, 2), 0);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[11, ARG]), E(errno::EINVAL), "2 pages for 4");
    exch(&f, res(0x3000, 2, 0), res(0x3100, 1, 10), 0);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[11, ARG]), E(errno::EPERM), "order 10");
    exch(&f, res(0x3000, 2, 0), res(0x3100, 1, 1), 0);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[11, ARG]), 0);
    assert_eq!(u64::from_le_bytes(f.get(ARG + 64, 8).try_into().unwrap()), 2, "nr_exchanged");
    assert!(f.dom.ram.is_given_back(0x500 * 4096) && f.dom.ram.is_given_back(0x501 * 4096));
    assert_eq!(f.get(0x600 * 4096, 3), vec![0; 3], "the new extent is fresh");
    // Again: the inputs are gone now, so nothing is exchanged.
    exch(&f, res(0x3000, 2, 0), res(0x3100, 1, 1), 0);
    assert_eq!(f.call(0, hc::MEMORY_OP, &[11, ARG]), E(errno::EINVAL));
    assert_eq!(u64::from_le_bytes(f.get(ARG + 64, 8).try_into().unwrap()), 0);
}
