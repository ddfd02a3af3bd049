//! Everything pvhvm does around Unicorn's gaps as the CPU of a full OS, in one
//! place (docs/unicorn.md has the measurements behind them):
//!
//! * Unicorn never delivers exceptions to the guest IDT, and its register API
//!   in 64-bit mode sets only the selector of CS/SS (no hidden base, limit,
//!   flags, no CPL). The vCPU therefore edits QEMU's `CPUX86State` through a
//!   saved context blob (`CpuState`) and recomputes the hidden flags itself.
//! * The exception error code and `old_exception` live only in that blob, at
//!   build-dependent offsets: `probe()` finds them by raising known faults.
//! * `old_exception` is never reset by Unicorn (QEMU resets it in the
//!   delivery code Unicorn skips), which turns the second fault into #DF and
//!   the third into a silent triple fault. `CpuState::end_exception` resets it.
//!
//! * Avoided rather than worked around: any memory hook, even one only for
//!   unmapped accesses, makes Unicorn keep every store to a page that ever
//!   held translated code on its slow path forever (its `notdirty_write`
//!   never marks the TLB entry dirty while a memory hook exists). That was
//!   over half of Linux's boot time, so the vCPU installs no memory hook
//!   that covers guest-physical addresses; unbacked accesses surface as the
//!   engine's error instead. (Its one memory hook covers only upper-half
//!   linear addresses, see `skip_block_walks`.)
//!
//! `probe()` runs once per process and doubles as the self-test: if any
//! workaround does not hold on this Unicorn build, no domain starts.

use std::ffi::c_void;

use std::sync::OnceLock;

use unicorn_engine::{uc_engine, HookType};

use crate::uc::{Context, Engine, Reg};

// Fixed offsets at the start of CPUX86State (x86-64 host, LP64): these follow
// from the declaration order alone and are checked against the register API
// by `probe()`.
const OFF_REGS: usize = 0;
const OFF_EIP: usize = 128;
const OFF_EFLAGS: usize = 136;
const OFF_HFLAGS: usize = 176;
const OFF_SEGS: usize = 184;
const SEG_SIZE: usize = 24;
const OFF_LDT: usize = 328;
const OFF_TR: usize = 352;
const OFF_GDT: usize = 376;
const OFF_IDT: usize = 400;
const OFF_CR: usize = 424;
const OFF_EFER: usize = 592;

pub const R_ES: usize = 0;
pub const R_CS: usize = 1;
pub const R_SS: usize = 2;
pub const R_DS: usize = 3;
pub const R_FS: usize = 4;
pub const R_GS: usize = 5;

// QEMU's hidden-flag bits (HF_*), which Unicorn keys translated code on.
pub const HF_CPL_MASK: u32 = 3;
pub const HF_INHIBIT_IRQ: u32 = 1 << 3;
const HF_CS32: u32 = 1 << 4;
const HF_SS32: u32 = 1 << 5;
const HF_ADDSEG: u32 = 1 << 6;
const HF_PE: u32 = 1 << 7;
const HF_TF: u32 = 1 << 8;
const HF_MP: u32 = 1 << 9;
const HF_EM: u32 = 1 << 10;
const HF_TS: u32 = 1 << 11;
const HF_IOPL: u32 = 3 << 12;
pub const HF_LMA: u32 = 1 << 14;
pub const HF_CS64: u32 = 1 << 15;
const HF_VM: u32 = 1 << 17;
const HF_OSFXSR: u32 = 1 << 22;
const HF_DERIVED: u32 = HF_CPL_MASK
    | HF_PE
    | HF_MP
    | HF_EM
    | HF_TS
    | HF_TF
    | HF_VM
    | HF_IOPL
    | HF_OSFXSR
    | HF_LMA
    | HF_CS32
    | HF_SS32
    | HF_CS64
    | HF_ADDSEG;

// Segment descriptor bits as QEMU keeps them in SegmentCache.flags (the high
// dword of the descriptor).
pub const DESC_TYPE_SHIFT: u32 = 8;
pub const DESC_A: u32 = 1 << 8;
pub const DESC_W: u32 = 1 << 9; // data: writable; code: readable
pub const DESC_CS: u32 = 1 << 11;
pub const DESC_S: u32 = 1 << 12;
pub const DESC_DPL_SHIFT: u32 = 13;
pub const DESC_P: u32 = 1 << 15;
pub const DESC_L: u32 = 1 << 21;
pub const DESC_B: u32 = 1 << 22;
pub const DESC_G: u32 = 1 << 23;

pub const RFLAGS_TF: u64 = 1 << 8;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_IOPL: u64 = 3 << 12;
pub const RFLAGS_NT: u64 = 1 << 14;
pub const RFLAGS_RF: u64 = 1 << 16;
pub const RFLAGS_VM: u64 = 1 << 17;

/// Offsets inside the context blob (and one in the engine) that only
/// `probe()` can find.
#[derive(Debug, Clone, Copy)]
pub struct BlobLayout {
    /// Size of Unicorn's `uc_context` header before the CPUX86State copy.
    pub data_offset: usize,
    pub error_code: usize,
    pub exception_is_int: usize,
    pub old_exception: usize,
    /// `uc_struct.no_exit_request`, from the engine handle (see `set_exit_checks`).
    pub no_exit_request: usize,
    /// `uc_struct.skip_sync_pc_on_exit`, from the engine handle (see
    /// `forget_pc_write`).
    pub skip_sync_pc_on_exit: usize,
    /// The interrupt line (see `InterruptLine`): `uc_struct.cpu` from the
    /// engine handle, `CPUState.interrupt_request` from the CPU, and
    /// `CPUX86State.vm_vmcb` in the blob.
    pub uc_cpu: usize,
    pub interrupt_request: usize,
    pub env_ptr: usize,
    pub vm_vmcb: usize,
    /// `CPUX86State.xcr0` (XSETBV's register, which the register API does
    /// not reach; a save carries it).
    pub xcr0: usize,
    /// `CPUX86State.tsc_offset`, which RDTSC adds to the host's counter: a
    /// restored guest's TSC goes on from where it was saved.
    pub tsc_offset: usize,
    /// How far below `CPUX86State` (in the engine) QEMU's per-mode TLB
    /// table descriptors begin (`CPUTLBDescFast f[0]`, see `SoftTlb`).
    pub tlb_fast_below_env: usize,
    /// `uc_struct.memory_mapping`, from the engine handle (see
    /// `watch_memory_lookups`).
    pub memory_mapping: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub flags: u32,
}

impl Segment {
    pub fn dpl(&self) -> u8 {
        ((self.flags >> DESC_DPL_SHIFT) & 3) as u8
    }
}

/// A saved CPU state that can be edited and written back. Only used while
/// the engine is stopped, where QEMU's EFLAGS copy is complete.
pub struct CpuState {
    ctx: Context,
    layout: BlobLayout,
}

fn rd<const N: usize>(d: &[u8], off: usize) -> [u8; N] {
    d[off..off + N].try_into().unwrap()
}

impl CpuState {
    pub fn layout(&self) -> BlobLayout {
        self.layout
    }

    pub fn new(engine: &Engine, layout: BlobLayout) -> Result<Self, String> {
        let ctx = Context::new(engine, layout.data_offset).map_err(|e| e.to_string())?;
        Ok(Self { ctx, layout })
    }

    /// The CPUX86State copy, for the self-test's searches.
    fn raw_data(&self) -> &[u8] {
        self.ctx.data()
    }
    fn raw_data_mut(&mut self) -> &mut [u8] {
        self.ctx.data_mut()
    }

    /// Make this state a copy of `other` (same build, same layout).
    pub fn copy_from(&mut self, other: &CpuState) {
        self.ctx.data_mut().copy_from_slice(other.ctx.data());
    }

    /// The paging mode and tables this state translates with.
    pub fn paging(&self) -> crate::mmu::PagingState {
        crate::mmu::PagingState { cr0: self.cr(0), cr3: self.cr(3), cr4: self.cr(4), efer: self.efer() }
    }

    pub fn load(&mut self, engine: &Engine) {
        self.ctx.save(engine).expect("uc_context_save cannot fail on a valid engine");
    }

    pub fn store(&mut self, engine: &Engine) {
        self.ctx.restore(engine).expect("uc_context_restore cannot fail on a valid engine");
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(rd(self.ctx.data(), off))
    }
    fn set_u64_at(&mut self, off: usize, v: u64) {
        self.ctx.data_mut()[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(rd(self.ctx.data(), off))
    }
    fn set_u32_at(&mut self, off: usize, v: u32) {
        self.ctx.data_mut()[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// General register by x86 encoding (0 = RAX … 15 = R15).
    pub fn reg(&self, n: usize) -> u64 {
        self.u64_at(OFF_REGS + 8 * n)
    }
    pub fn set_reg(&mut self, n: usize, v: u64) {
        self.set_u64_at(OFF_REGS + 8 * n, v)
    }
    pub fn rip(&self) -> u64 {
        self.u64_at(OFF_EIP)
    }
    pub fn set_rip(&mut self, v: u64) {
        self.set_u64_at(OFF_EIP, v)
    }
    pub fn rflags(&self) -> u64 {
        self.u64_at(OFF_EFLAGS)
    }
    pub fn set_rflags(&mut self, v: u64) {
        self.set_u64_at(OFF_EFLAGS, v | 2)
    }
    pub fn hflags(&self) -> u32 {
        self.u32_at(OFF_HFLAGS)
    }
    fn set_hflags(&mut self, v: u32) {
        self.set_u32_at(OFF_HFLAGS, v)
    }
    pub fn cpl(&self) -> u8 {
        (self.hflags() & HF_CPL_MASK) as u8
    }
    pub fn in_64bit_code(&self) -> bool {
        self.hflags() & HF_CS64 != 0
    }
    pub fn interrupt_shadow(&self) -> bool {
        self.hflags() & HF_INHIBIT_IRQ != 0
    }
    pub fn cr(&self, n: usize) -> u64 {
        self.u64_at(OFF_CR + 8 * n)
    }
    pub fn set_cr(&mut self, n: usize, v: u64) {
        self.set_u64_at(OFF_CR + 8 * n, v)
    }
    pub fn efer(&self) -> u64 {
        self.u64_at(OFF_EFER)
    }
    pub fn set_efer(&mut self, v: u64) {
        self.set_u64_at(OFF_EFER, v)
    }

    fn seg_at(&self, off: usize) -> Segment {
        Segment {
            selector: self.u32_at(off) as u16,
            base: self.u64_at(off + 8),
            limit: self.u32_at(off + 16),
            flags: self.u32_at(off + 20),
        }
    }
    fn set_seg_at(&mut self, off: usize, s: Segment) {
        self.set_u32_at(off, s.selector as u32);
        self.set_u64_at(off + 8, s.base);
        self.set_u32_at(off + 16, s.limit);
        self.set_u32_at(off + 20, s.flags);
    }
    pub fn seg(&self, n: usize) -> Segment {
        self.seg_at(OFF_SEGS + SEG_SIZE * n)
    }
    /// Load a segment's hidden cache. Call `sync_hflags` when done editing.
    pub fn set_seg(&mut self, n: usize, s: Segment) {
        self.set_seg_at(OFF_SEGS + SEG_SIZE * n, s)
    }
    pub fn ldt(&self) -> Segment {
        self.seg_at(OFF_LDT)
    }
    pub fn tr(&self) -> Segment {
        self.seg_at(OFF_TR)
    }
    pub fn set_tr(&mut self, s: Segment) {
        self.set_seg_at(OFF_TR, s)
    }
    pub fn gdt(&self) -> (u64, u32) {
        let s = self.seg_at(OFF_GDT);
        (s.base, s.limit)
    }
    pub fn set_gdt(&mut self, base: u64, limit: u32) {
        self.set_seg_at(OFF_GDT, Segment { selector: 0, base, limit, flags: 0 })
    }
    pub fn set_idt(&mut self, base: u64, limit: u32) {
        self.set_seg_at(OFF_IDT, Segment { selector: 0, base, limit, flags: 0 })
    }
    pub fn set_ldt(&mut self, s: Segment) {
        self.set_seg_at(OFF_LDT, s)
    }
    pub fn idt(&self) -> (u64, u32) {
        let s = self.seg_at(OFF_IDT);
        (s.base, s.limit)
    }

    /// The error code of the exception that just stopped the engine.
    pub fn error_code(&self) -> u32 {
        self.u32_at(self.layout.error_code)
    }
    /// Whether that exception came from INT n / INT3 / INTO (software).
    pub fn exception_is_int(&self) -> bool {
        self.u32_at(self.layout.exception_is_int) != 0
    }
    /// Take the engine's state from inside a hook.
    ///
    /// # Safety
    /// `uc` must be the engine this state was made for.
    pub unsafe fn load_raw(&mut self, uc: *mut unicorn_engine::uc_engine) {
        let _ = self.ctx.save_raw(uc);
    }

    /// What raising an exception leaves behind (CR2, the error code,
    /// software or not, QEMU's old_exception), copied from `other`.
    pub fn copy_exception_fields_from(&mut self, other: &CpuState) {
        for off in [self.layout.error_code, self.layout.exception_is_int, self.layout.old_exception] {
            self.set_u32_at(off, other.u32_at(off));
        }
        self.set_cr(2, other.cr(2));
    }

    /// Forget the exception in flight (Unicorn's missing reset).
    pub fn end_exception(&mut self) {
        self.set_u32_at(self.layout.old_exception, u32::MAX);
    }
    /// Where QEMU reads the VIRQ line's vector (see `InterruptLine`).
    pub fn set_vm_vmcb(&mut self, gpa: u64) {
        let off = self.layout.vm_vmcb;
        self.set_u64_at(off, gpa)
    }

    /// XCR0, the state components XSAVE/XRSTOR cover (set by XSETBV).
    pub fn xcr0(&self) -> u64 {
        self.u64_at(self.layout.xcr0)
    }
    pub fn set_xcr0(&mut self, v: u64) {
        let off = self.layout.xcr0;
        self.set_u64_at(off, v)
    }

    /// What RDTSC adds to the host's TSC for this vCPU.
    pub fn tsc_offset(&self) -> u64 {
        self.u64_at(self.layout.tsc_offset)
    }
    pub fn set_tsc_offset(&mut self, v: u64) {
        let off = self.layout.tsc_offset;
        self.set_u64_at(off, v)
    }

    /// The exception QEMU's check_exception last recorded (-1: none).
    pub fn old_exception(&self) -> i32 {
        self.u32_at(self.layout.old_exception) as i32
    }

    /// Recompute the hidden flags from CR0, CR4, EFER, EFLAGS and the
    /// segment caches, as the processor's state implies them (CPL is the DPL
    /// of SS). Bits that are not derived (interrupt shadow, SMM …) stay.
    pub fn sync_hflags(&mut self) {
        let cr0 = self.cr(0);
        let cr4 = self.cr(4);
        let efer = self.efer();
        let eflags = self.rflags() as u32;
        let cs = self.seg(R_CS);
        let ss = self.seg(R_SS);
        let mut hf = self.hflags() & !HF_DERIVED;
        hf |= (ss.flags >> DESC_DPL_SHIFT) & HF_CPL_MASK;
        hf |= ((cr0 as u32) & 1) << 7; // PE
        hf |= ((cr0 as u32) << 8) & (HF_MP | HF_EM | HF_TS); // MP, EM, TS are CR0 bits 1..3
        hf |= eflags & (HF_TF | HF_VM | HF_IOPL);
        if cr4 & (1 << 9) != 0 {
            hf |= HF_OSFXSR;
        }
        if efer & crate::mmu::EFER_LMA != 0 {
            hf |= HF_LMA;
        }
        if hf & HF_LMA != 0 && cs.flags & DESC_L != 0 {
            hf |= HF_CS32 | HF_SS32 | HF_CS64;
        } else {
            hf |= (cs.flags & DESC_B) >> (22 - 4);
            hf |= (ss.flags & DESC_B) >> (22 - 5);
            let not_flat_32 = cr0 & 1 == 0 || eflags as u64 & RFLAGS_VM != 0 || hf & HF_CS32 == 0;
            if not_flat_32 || (self.seg(R_DS).base | self.seg(R_ES).base | ss.base) != 0 {
                hf |= HF_ADDSEG;
            }
        }
        self.set_hflags(hf);
    }

    /// As after STI or MOV SS: no interrupt before the next instruction.
    pub fn set_interrupt_shadow(&mut self) {
        let hf = self.hflags() | HF_INHIBIT_IRQ;
        self.set_hflags(hf);
    }

    pub fn clear_interrupt_shadow(&mut self) {
        let hf = self.hflags() & !HF_INHIBIT_IRQ;
        self.set_hflags(hf);
    }
}

/// Fix up a context saved inside a hook: RIP as the hook saw it, and the
/// complete EFLAGS (the saved copy lacks the lazily kept arithmetic flags,
/// and QEMU rebuilds them from EFLAGS when emulation starts again).
pub fn patch_rip_rflags(data: &mut [u8], rip: u64, rflags: u64) {
    data[OFF_EIP..OFF_EIP + 8].copy_from_slice(&rip.to_le_bytes());
    data[OFF_EFLAGS..OFF_EFLAGS + 8].copy_from_slice(&rflags.to_le_bytes());
}

/// Flat segments as the processor loads them from typical descriptors.
pub fn flat_code64(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        flags: DESC_P | DESC_S | DESC_CS | DESC_W | DESC_A | DESC_L | DESC_G | ((dpl as u32) << DESC_DPL_SHIFT),
    }
}
pub fn flat_code32(selector: u16) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        flags: DESC_P | DESC_S | DESC_CS | DESC_W | DESC_A | DESC_B | DESC_G,
    }
}
pub fn flat_data(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        flags: DESC_P | DESC_S | DESC_W | DESC_A | DESC_B | DESC_G | ((dpl as u32) << DESC_DPL_SHIFT),
    }
}

// ---------------------------------------------------------------------------
// The exit check after every memory access.

/// Unicorn (not QEMU) emits a call to `helper_check_exit_request` after every
/// guest load and store, so that a stop requested by a memory hook takes
/// effect at once. The vCPU has no memory hook, and the call costs the guest
/// about a tenth of its speed: every access becomes a helper call that
/// spills TCG's registers.
///
/// With the checks off (`uc_struct.no_exit_request`, which Unicorn itself
/// sets only for ARM IT blocks; read at translation time) a stop is seen at
/// the start of the next translated block. That is what makes a stop from
/// another thread exact (ticker.rs); with the checks on it could land after
/// a store but with RIP back at its instruction, which then ran twice. A
/// stop from a device callback, too, lands at the next block boundary.
/// Single-stepping (`count`) needs the checks on: its hook stops through
/// the check after it. Flush translated code after changing this.
pub fn set_exit_checks(engine: &Engine, layout: &BlobLayout, on: bool) {
    // SAFETY: the offset was found in an engine of this same build by
    // `find_no_exit_request` and confirmed by `probe()`; the field is a bool.
    unsafe { *(engine.raw() as *mut u8).add(layout.no_exit_request) = u8::from(!on) };
}

/// Where `uc_struct.no_exit_request` is in this engine, found by the run of
/// fields around it (Unicorn 2.1's `uc_priv.h`):
///
/// ```text
/// u32 target_page_size = 4096; u32 target_page_align = 4095;
/// u64 qemu_host_page_size; u64 qemu_real_host_page_size; int icache_linesize;
/// int context_content = UC_CTL_CONTEXT_CPU (1); int cpu_context_size;
/// u64 next_pc; bool hook_insert, first_tb, no_exit_request, init_done = 1;
/// ```
///
/// `cpu_context_size` is what `uc_context_size` adds to its header, so the
/// run is specific enough for a forward scan that stops at the first match
/// (and so never reads past the field). `probe()` then checks what turning
/// it on does. Returns the byte offset from the engine handle.
///
/// # Safety
/// `uc` must be an open engine of this Unicorn build.
unsafe fn find_no_exit_request(uc: *mut uc_engine, cpu_context_size: usize) -> Option<usize> {
    const SCAN_LIMIT: usize = 1 << 16;
    extern "C" {
        fn getpagesize() -> std::ffi::c_int;
    }
    let host_page = getpagesize() as u64;
    let base = uc as *const u8;
    let u32_at = |o: usize| std::ptr::read_unaligned(base.add(o) as *const u32);
    let u64_at = |o: usize| std::ptr::read_unaligned(base.add(o) as *const u64);
    (0..SCAN_LIMIT).step_by(8).find_map(|a| {
        let hit = u32_at(a) == 4096
            && u32_at(a + 4) == 4095
            && u64_at(a + 8) == host_page
            && u64_at(a + 16) == host_page
            && u32_at(a + 28) == 1
            && u32_at(a + 32) as usize == cpu_context_size
            && *base.add(a + 50) == 0
            && *base.add(a + 51) == 1;
        hit.then_some(a + 50)
    })
}

/// Undo one side effect of writing RIP from a hook. `uc_reg_write(RIP)`
/// sets `skip_sync_pc_on_exit` so that the exit it requests does not restore
/// RIP from the translated block; but after an instruction hook (VMCALL)
/// that exit happens outside any block and leaves the flag set. The next
/// stop at a block start (a kick) then skips the restore and resumes at a
/// stale RIP, from before the chained blocks that ran since. Call this
/// right after such a write.
///
/// # Safety
/// `uc` must be the engine `layout` was probed for (same build).
pub unsafe fn forget_pc_write(uc: *mut uc_engine, layout: &BlobLayout) {
    *(uc as *mut u8).add(layout.skip_sync_pc_on_exit) = 0;
}

/// Where `uc_struct.skip_sync_pc_on_exit` should be: the struct's last
/// field, after `init_done` (right after `no_exit_request`), 64 `sigjmp_buf`
/// (200 bytes each on x86-64 glibc), an int, three pointers, a u32, a
/// pointer, an i32, a u64 and two bools. `probe()` checks that the byte
/// there follows the flag's life (set by a RIP write, cleared by a start).
fn skip_sync_pc_offset(no_exit_request: usize) -> usize {
    const SIGJMP_BUF: usize = 200;
    let align8 = |x: usize| (x + 7) & !7;
    let jmp_bufs = align8(no_exit_request + 2);
    let nested_level = jmp_bufs + 64 * SIGJMP_BUF;
    let last_tb = align8(nested_level + 4);
    let tcg_buffer_size = last_tb + 16; // after last_tb and empty_view
    let unmapped_regions = align8(tcg_buffer_size + 4);
    let nested = align8(unmapped_regions + 8 + 4); // after snapshot_level
    nested + 8 + 2 // after thread_executable_entry, current_executable
}

unsafe extern "C" fn probe_mmio_read(_uc: *mut uc_engine, _offset: u64, _size: std::ffi::c_uint, _user: *mut c_void) -> u64 {
    0
}

/// A device whose register write stops the engine, as the LAPIC's may.
unsafe extern "C" fn probe_mmio_write(
    uc: *mut uc_engine,
    _offset: u64,
    _size: std::ffi::c_uint,
    _value: u64,
    _user: *mut c_void,
) {
    unicorn_engine::uc_emu_stop(uc);
}

// ---------------------------------------------------------------------------
// Stores to pages the guest maps executable.

/// `TLB_NOTDIRTY` in `CPUTLBEntry.addr_write`: stores take the slow path
/// (`notdirty_write`, which drops translated code they overwrite).
const TLB_NOTDIRTY: u64 = 1 << 10;
/// All of QEMU's flag bits there (DISCARD_WRITE, BSWAP, WATCHPOINT, MMIO,
/// NOTDIRTY, INVALID: bits 6 to 11 with 4 KiB pages).
const TLB_FLAG_BITS: u64 = 0xfc0;
const PAGE_MASK: u64 = !0xfff;
/// x86's MMU modes (supervisor with SMAP, user, supervisor without SMAP).
const NB_MMU_MODES: usize = 3;
/// `1 << CPU_TLB_ENTRY_BITS`: addr_read, addr_write, addr_code, paddr
/// (Unicorn's), addend, padded to a power of two.
const TLB_ENTRY_SIZE: usize = 64;
const TLB_ADDR_WRITE: usize = 8;
const TLB_ADDR_CODE: usize = 16;
const TLB_PADDR: usize = 24;
const TLB_ADDEND: usize = 32;
/// The most entries a dynamic TLB table grows to (`CPU_TLB_DYN_MAX_BITS`).
const TLB_MAX_ENTRIES: u64 = 1 << 22;

extern "C" {
    /// QEMU's `tlb_reset_dirty` (accel/tcg/cputlb.c, a global symbol of
    /// Unicorn's static library): every TLB entry of `cpu`, in every mode
    /// and in the victim tables, whose host page lies in
    /// `[start, start + length)` gets `TLB_NOTDIRTY` back.
    fn tlb_reset_dirty_x86_64(cpu: *mut c_void, start: usize, length: usize);
    /// Unicorn's stand-in for QEMU's `tlb_protect_code`, which `tb_gen_code`
    /// calls for every new block: a walk of the whole TLB, in every mode and
    /// the victim tables, putting `TLB_NOTDIRTY` back on entries whose
    /// *virtual* page lies in `[start, start + length)`.
    fn tlb_reset_dirty_by_vaddr_x86_64(cpu: *mut c_void, start: u64, length: u64);
    /// Unicorn's guest-physical address -> memory region lookup
    /// (unicorn_common.h), which `uc_struct.memory_mapping` points at.
    fn find_memory_mapping_x86_64(uc: *mut uc_engine, addr: u64) -> *mut c_void;
}

/// A stand-in for `uc_struct.memory_mapping` (see `watch_memory_lookups`).
pub type MemoryLookup = unsafe extern "C" fn(uc: *mut uc_engine, addr: u64) -> *mut c_void;

/// Unicorn's own lookup, for a stand-in to answer with.
///
/// # Safety
/// `uc` must be an open engine.
pub unsafe fn memory_lookup(uc: *mut uc_engine, addr: u64) -> *mut c_void {
    find_memory_mapping_x86_64(uc, addr)
}

/// Have `lookup` called in place of Unicorn's guest-physical lookup
/// (`None`: Unicorn's again). Unicorn calls it on every slow-path guest
/// access, twice for a store to a `TLB_NOTDIRTY` entry (store_helper,
/// then notdirty_write), with the entry's page: the one place where the
/// vCPU can see such a store coming. `lookup` must answer as Unicorn's
/// does (`memory_lookup`).
///
/// # Safety
/// `uc` must be an open engine of the build `layout` was probed on.
pub unsafe fn watch_memory_lookups(uc: *mut uc_engine, layout: &BlobLayout, lookup: Option<MemoryLookup>) {
    let f: MemoryLookup = lookup.unwrap_or(find_memory_mapping_x86_64);
    *((uc as *mut u8).add(layout.memory_mapping) as *mut MemoryLookup) = f;
}

/// Where `uc_struct.memory_mapping` is: the one word of the engine's
/// structure that holds Unicorn's lookup function. It comes before
/// `no_exit_request` (`before`), and the scan stops there: the heap past
/// the structure may hold another copy of the pointer (a freed engine's).
/// Scanning on up to 64 KiB failed the self-test once in a test run (every
/// domain of that process refused), which only a second copy explains.
fn find_memory_mapping_field(uc: *mut uc_engine, before: usize) -> Option<usize> {
    let want = find_memory_mapping_x86_64 as MemoryLookup as usize as u64;
    let words = read_own_words(uc as usize, before / 8);
    let hits: Vec<usize> = words.iter().enumerate().filter(|(_, w)| **w == Some(want)).map(|(i, _)| 8 * i).collect();
    match hits[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// The engine's software TLB, for giving stores to executable pages back
/// their fast path.
///
/// Unicorn has no dirty-memory bitmap (`cpu_physical_memory_is_clean` is
/// always true), so every writable RAM entry starts `TLB_NOTDIRTY`, and its
/// `notdirty_write` clears the flag after the first store only if the
/// entry is not executable (`addr_code == -1`): it cannot tell whether the
/// page holds translated code. A page the guest maps without NX thus pays
/// the slow path (memory-region lookups, a page-descriptor walk, the
/// translated-code check) on every store, for as long as the entry lives.
/// Linux maps its whole image (.data, .bss, the boot stack) executable
/// until `mark_rodata_ro`, just before init: that was over two thirds of
/// the host time before the first kernel line. QEMU clears the flag once
/// the page has no translated code (its DIRTY_MEMORY_CODE bit).
///
/// The vCPU does what QEMU does from outside: it keeps the set of
/// guest-physical pages translated code came from (`code_page` at each new
/// block; Unicorn marks the translating address itself), clears the flag
/// between runs on entries of other pages (`clear_not_dirty`), and when a
/// page first gets code, puts the flag back on every entry that reaches it
/// (`protect`), whatever its virtual address.
pub struct SoftTlb {
    /// `CPUTLBDescFast f[0]`: per mode, (mask, table).
    fast: *const u64,
    cpu: *mut c_void,
    /// Recent (virtual - physical) page offsets of entries seen, most
    /// recent first: where `clear_page` looks for a physical page's entries
    /// (a kernel maps its image and its RAM at a few fixed offsets).
    offsets: [u64; OFFSETS_KEPT],
}

const OFFSETS_KEPT: usize = 4;

// SAFETY: pointers into the engine, used only on its thread while it lives.
unsafe impl Send for SoftTlb {}

impl SoftTlb {
    /// # Safety
    /// `uc` must be an open, initialised engine of the build `layout` was
    /// probed on; the result must not outlive it.
    pub unsafe fn new(uc: *mut uc_engine, layout: &BlobLayout) -> Self {
        let cpu = *((uc as *const u8).add(layout.uc_cpu) as *const *mut u8);
        let env = *(cpu.add(layout.env_ptr) as *const *mut u8);
        Self { fast: env.sub(layout.tlb_fast_below_env) as *const u64, cpu: cpu as *mut c_void, offsets: [0; OFFSETS_KEPT] }
    }

    /// Note that some virtual page maps physical `paddr` at `vaddr`.
    fn learn_offset(&mut self, vaddr: u64, paddr: u64) {
        let off = (vaddr & PAGE_MASK).wrapping_sub(paddr & PAGE_MASK);
        let at = self.offsets.iter().position(|&o| o == off).unwrap_or(OFFSETS_KEPT - 1);
        self.offsets.copy_within(0..at, 1);
        self.offsets[0] = off;
    }

    /// Clear `TLB_NOTDIRTY` on the entries of physical page `paddr` (whose
    /// page holds no translated code) at the offsets seen lately: what
    /// QEMU's notdirty_write does, from Unicorn's lookup of that page.
    /// Returns how many entries changed.
    ///
    /// # Safety
    /// As `clear_not_dirty`; the engine may be inside a helper.
    pub unsafe fn clear_page(&self, paddr: u64) -> u64 {
        let page = paddr & PAGE_MASK;
        let mut cleared = 0;
        for off in self.offsets {
            let vaddr = page.wrapping_add(off);
            for mode in 0..NB_MMU_MODES {
                let (table, n) = self.table(mode);
                let e = Self::entry(table, n, vaddr);
                let write = e.add(TLB_ADDR_WRITE) as *mut u64;
                if *write == vaddr | TLB_NOTDIRTY && *(e.add(TLB_PADDR) as *const u64) & PAGE_MASK == page {
                    *write = vaddr;
                    cleared += 1;
                }
            }
        }
        cleared
    }

    /// The table of `mode` and its number of entries.
    unsafe fn table(&self, mode: usize) -> (*mut u8, u64) {
        let mask = *self.fast.add(2 * mode);
        let table = *self.fast.add(2 * mode + 1) as *mut u8;
        (table, (mask >> 6) + 1)
    }

    unsafe fn entry(table: *mut u8, n: u64, vaddr: u64) -> *mut u8 {
        table.add(((vaddr >> 12) & (n - 1)) as usize * TLB_ENTRY_SIZE)
    }

    /// The guest-physical and host page behind the code entry of the page
    /// of `vaddr`, in each mode that has one (what a block just translated
    /// from there was read through).
    ///
    /// # Safety
    /// The engine must be alive and not running on another thread.
    pub unsafe fn code_page(&mut self, vaddr: u64, mut found: impl FnMut(u64, usize)) -> bool {
        let page = vaddr & PAGE_MASK;
        let mut any = false;
        for mode in 0..NB_MMU_MODES {
            let (table, n) = self.table(mode);
            let e = Self::entry(table, n, page);
            let code = *(e.add(TLB_ADDR_CODE) as *const u64);
            if code != u64::MAX && code & PAGE_MASK == page && code & TLB_FLAG_BITS == 0 {
                let host = (page as usize).wrapping_add(*(e.add(TLB_ADDEND) as *const usize));
                let paddr = *(e.add(TLB_PADDR) as *const u64) & PAGE_MASK;
                found(paddr, host);
                if !any {
                    self.learn_offset(page, paddr);
                }
                any = true;
            }
        }
        any
    }

    /// Let stores through entries of RAM pages that hold no translated code
    /// (`holds_code(guest-physical page)` false) take the fast path.
    /// Returns how many entries changed.
    ///
    /// # Safety
    /// As `code_page`, with the engine stopped.
    pub unsafe fn clear_not_dirty(&mut self, holds_code: impl Fn(u64) -> bool) -> u64 {
        let mut cleared = 0;
        let mut last = None;
        for mode in 0..NB_MMU_MODES {
            let (table, n) = self.table(mode);
            for i in 0..n as usize {
                let e = table.add(i * TLB_ENTRY_SIZE);
                let write = e.add(TLB_ADDR_WRITE) as *mut u64;
                let paddr = *(e.add(TLB_PADDR) as *const u64) & PAGE_MASK;
                if *write & TLB_FLAG_BITS == TLB_NOTDIRTY && !holds_code(paddr) {
                    *write &= !TLB_NOTDIRTY;
                    cleared += 1;
                    last = Some((*write, paddr));
                }
            }
        }
        if let Some((vaddr, paddr)) = last {
            self.learn_offset(vaddr, paddr);
        }
        cleared
    }

    /// Send stores to the host page `host` through the slow path again,
    /// from every entry that reaches it.
    ///
    /// # Safety
    /// As `clear_not_dirty`.
    pub unsafe fn protect(&self, host: usize) {
        tlb_reset_dirty_x86_64(self.cpu, host & PAGE_MASK as usize, 0x1000);
    }

    /// What Unicorn's `tb_gen_code` does for a block of `size` bytes at
    /// linear `pc` when it does not skip it (see `skip_block_walks`).
    ///
    /// # Safety
    /// As `clear_not_dirty`.
    pub unsafe fn protect_block(&self, pc: u64, size: u64) {
        tlb_reset_dirty_by_vaddr_x86_64(self.cpu, pc & PAGE_MASK, (pc & !PAGE_MASK) + size);
    }

    /// Whether stores through the entry for `vaddr` (in any mode) take the
    /// slow path (`Some(true)`), the fast one, or there is no such entry.
    ///
    /// # Safety
    /// As `code_page`.
    unsafe fn store_is_slow(&self, vaddr: u64) -> Option<bool> {
        (0..NB_MMU_MODES).find_map(|mode| {
            let (table, n) = self.table(mode);
            let write = *(Self::entry(table, n, vaddr).add(TLB_ADDR_WRITE) as *const u64);
            (write & PAGE_MASK == vaddr & PAGE_MASK && write & (TLB_FLAG_BITS & !TLB_NOTDIRTY) == 0)
                .then_some(write & TLB_NOTDIRTY != 0)
        })
    }
}

/// The linear addresses whose new blocks Unicorn does not walk the TLB for
/// (`skip_block_walks`): the upper half, where 64-bit kernels run.
pub const NO_WALK_START: u64 = 0xffff_8000_0000_0000;

/// For every new block, Unicorn's `tb_gen_code` walks the whole TLB, every
/// mode and the victim tables (`tlb_reset_dirty_by_vaddr`), to put
/// `TLB_NOTDIRTY` back on the entries of the block's virtual page: its
/// stand-in for QEMU's `tlb_protect_code`, which QEMU makes only when a
/// physical page gets its first block, through its dirty bitmap. With the
/// TLB at its usual 1-4k entries per mode that was about 9% of Linux's
/// boot. The walk is skipped when a memory hook covers the block's linear
/// address (`uc_mem_hook_installed(tb->pc)`). A fetch-unmapped hook over
/// `[begin, end]` does that and nothing else, as long as the range holds
/// no guest-physical address: Unicorn checks every other use of memory
/// hooks (calling them, `notdirty_write` keeping stores slow) against
/// physical addresses, and compiles no call for this kind. What the walk
/// protected, the vCPU protects itself: a page that gets its first block
/// loses the fast path from every entry reaching it (`SoftTlb::protect`),
/// and a block whose page it cannot find is walked by `protect_block`.
///
/// # Safety
/// As `Engine::add_hook_range`.
pub unsafe fn skip_block_walks(engine: &mut Engine, begin: u64, end: u64) -> Result<unicorn_engine::uc_hook, crate::uc::UcError> {
    engine.add_hook_range(HookType::MEM_FETCH_UNMAPPED, not_handled as *mut c_void, std::ptr::null_mut(), begin, end)
}

/// The hook behind `skip_block_walks`: never called for a guest-physical
/// address outside its range; if it were, the fetch fails as without it.
unsafe extern "C" fn not_handled(
    _uc: *mut uc_engine,
    _kind: std::ffi::c_int,
    _addr: u64,
    _size: std::ffi::c_int,
    _value: i64,
    _user: *mut c_void,
) -> bool {
    false
}

/// Where `CPUTLBDescFast f[0]` is below `env`, found after the engine ran
/// `store` (a store to `data` from code at `code`, paging off): three
/// (mask, table) pairs, each mask `(2^k - 1) << 6`, and in one of the
/// tables the entries of both pages, with the store's page still
/// `TLB_NOTDIRTY` (Unicorn's rule for executable pages) and its host page
/// `host_data`.
fn find_tlb_fast(env: usize, code: u64, data: u64, host_data: usize) -> Option<usize> {
    let valid_mask = |m: u64| m != 0 && m & 0x3f == 0 && ((m >> 6) + 1).is_power_of_two() && (m >> 6) < TLB_MAX_ENTRIES;
    (16..=4096).step_by(16).find(|&below| {
        let f = env - below;
        (0..NB_MMU_MODES).all(|m| {
            read_own_u64(f + 16 * m).is_some_and(valid_mask)
                && read_own_u64(f + 16 * m + 8).is_some_and(|t| t != 0 && t % 8 == 0)
        }) && (0..NB_MMU_MODES).any(|m| {
            let (Some(mask), Some(table)) = (read_own_u64(f + 16 * m), read_own_u64(f + 16 * m + 8)) else {
                return false;
            };
            let at = |va: u64, field: usize| read_own_u64(table as usize + ((va >> 12) & (mask >> 6)) as usize * TLB_ENTRY_SIZE + field);
            at(code, TLB_ADDR_CODE) == Some(code)
                && at(data, TLB_ADDR_WRITE) == Some(data | TLB_NOTDIRTY)
                && at(data, TLB_PADDR) == Some(data)
                && at(data, TLB_ADDEND).is_some_and(|a| (data as usize).wrapping_add(a as usize) == host_data)
        })
    })
}

// ---------------------------------------------------------------------------
// An interrupt line: exact interrupt windows.

/// QEMU's `CPU_INTERRUPT_VIRQ` bit in `CPUState.interrupt_request`.
const CPU_INTERRUPT_VIRQ: u32 = 0x100;
/// `offsetof(struct vmcb, control.int_vector)`: where QEMU reads the VIRQ
/// line's vector, relative to `CPUX86State.vm_vmcb`.
pub const VMCB_INT_VECTOR: u64 = 0x64;
/// What the acknowledge answers: a vector past any IDT, so QEMU gives up
/// the delivery with #GP(`ACK_ERROR_CODE`) before it touches guest state.
pub const ACK_VECTOR: u64 = 0x1000;
/// The error code of that #GP (vector × 16 + 2 on Unicorn's 64-bit path);
/// no real #GP has it (selectors and IDT indexes are below 0x10000).
pub const ACK_ERROR_CODE: u32 = 0x10002;

/// Unicorn has no way to inject an interrupt, and no hook sees STI, POPF
/// or IRET, so an interrupt pending while the guest runs with IF=0 cannot
/// be delivered the moment IF comes back. QEMU's VIRQ line can tell us:
/// raise it, and QEMU itself checks it at every return to its main loop
/// (which STI + one instruction, POPF and IRET all cause), and once IF=1
/// with no interrupt shadow it "acknowledges" by reading the vector at
/// `vm_vmcb + 0x64`. `vm_vmcb` points at an MMIO page of ours, whose read
/// callback lowers the line, stops the engine and answers `ACK_VECTOR`, so
/// that QEMU aborts its own delivery (a #GP with `ACK_ERROR_CODE`, nothing
/// executed or pushed). The vCPU loop then delivers the interrupt itself,
/// exactly at the window. (Measured exact; docs/unicorn.md.)
pub struct InterruptLine {
    request: *const std::sync::atomic::AtomicU32,
    old_exception: *mut i32,
}

// SAFETY: the pointers are into the engine, which outlives the line (the
// `Cpu` owns both), and are only used on the engine's thread.
unsafe impl Send for InterruptLine {}

/// The running vCPU's mode as the engine holds it mid-run (its hflags),
/// for hooks that must know it without saving the whole context: a
/// hypercall's ABI follows CS.L at the VMCALL, as with Xen.
pub struct LiveMode {
    hflags: *const u32,
}

// SAFETY: as for InterruptLine: a pointer into the engine, used on its thread.
unsafe impl Send for LiveMode {}

impl LiveMode {
    /// # Safety
    /// As `InterruptLine::new`.
    pub unsafe fn new(uc: *mut uc_engine, layout: &BlobLayout) -> Self {
        let cpu = *((uc as *const u8).add(layout.uc_cpu) as *const *mut u8);
        let env = *(cpu.add(layout.env_ptr) as *const *mut u8);
        Self { hflags: env.add(OFF_HFLAGS) as *const u32 }
    }

    fn hflags(&self) -> u32 {
        unsafe { std::ptr::read_volatile(self.hflags) }
    }

    /// Executing 64-bit code (long mode with a CS.L code segment).
    pub fn in_64bit_code(&self) -> bool {
        self.hflags() & HF_CS64 != 0
    }

    /// The current privilege level (0 in real mode whatever CS holds).
    pub fn cpl(&self) -> u8 {
        (self.hflags() & HF_CPL_MASK) as u8
    }

    /// The width of the code being executed: 64, 32 or 16 bits.
    pub fn code_bits(&self) -> u8 {
        let hflags = self.hflags();
        if hflags & HF_CS64 != 0 {
            64
        } else if hflags & HF_CS32 != 0 {
            32
        } else {
            16
        }
    }

    /// Virtual-8086 mode, where Xen refuses hypercalls.
    pub fn in_vm86(&self) -> bool {
        self.hflags() & HF_VM != 0
    }
}

impl InterruptLine {
    /// # Safety
    /// `uc` must be an open, initialised engine of this build (`layout`
    /// probed on the same build).
    pub unsafe fn new(uc: *mut uc_engine, layout: &BlobLayout) -> Self {
        let cpu = *((uc as *const u8).add(layout.uc_cpu) as *const *mut u8);
        let env = *(cpu.add(layout.env_ptr) as *const *mut u8);
        Self {
            request: cpu.add(layout.interrupt_request) as *const std::sync::atomic::AtomicU32,
            old_exception: env.add(layout.old_exception) as *mut i32,
        }
    }

    pub fn raise(&self) {
        unsafe { (*self.request).fetch_or(CPU_INTERRUPT_VIRQ, std::sync::atomic::Ordering::SeqCst) };
    }

    /// Lower the line; returns whether it was raised.
    pub fn lower(&self) -> bool {
        unsafe { (*self.request).fetch_and(!CPU_INTERRUPT_VIRQ, std::sync::atomic::Ordering::SeqCst) & CPU_INTERRUPT_VIRQ != 0 }
    }

    /// For the acknowledge callback: lower the line and forget the
    /// exception QEMU is about to raise for it, so that check_exception
    /// does not make a #DF of the next one. Returns whether it was raised.
    pub fn acknowledge(&self) -> bool {
        let raised = self.lower();
        if raised {
            unsafe { std::ptr::write_volatile(self.old_exception, -1) };
        }
        raised
    }
}

/// Read `buf.len()` bytes at `addr` of our own memory without faulting on
/// an unmapped address (the engine's structures are scanned blind).
fn read_own(addr: usize, buf: &mut [u8]) -> bool {
    let local = libc::iovec { iov_base: buf.as_mut_ptr() as *mut c_void, iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut c_void, iov_len: buf.len() };
    // SAFETY: process_vm_readv on ourselves copies into `buf`, or fails.
    unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) == buf.len() as isize }
}

/// `n` words at `addr` of our own memory, in one read where the whole
/// range is mapped (a read per word costs a system call: the probe's
/// scans made over 100,000 of them, most of the self-test's time).
fn read_own_words(addr: usize, n: usize) -> Vec<Option<u64>> {
    let mut buf = vec![0u8; 8 * n];
    if read_own(addr, &mut buf) {
        return buf.chunks_exact(8).map(|w| Some(u64::from_le_bytes(w.try_into().unwrap()))).collect();
    }
    (0..n).map(|i| read_own_u64(addr.wrapping_add(8 * i))).collect()
}

fn read_own_u64(addr: usize) -> Option<u64> {
    let mut b = [0u8; 8];
    read_own(addr, &mut b).then(|| u64::from_le_bytes(b))
}

/// `uc_struct.cpu` and `CPUState.env_ptr`: a pointer in the engine to a
/// structure holding the pair (env, env - 16) = (`env_ptr`,
/// `icount_decr_ptr`), where env begins with the registers just written
/// (RAX = `a`, RBX = `b`). Then `interrupt_request`: after `nr_cores` and
/// `nr_threads` (1, 1), the first u32 of -1 is `cflags_next_tb`, and the
/// next one (0) is it.
fn find_interrupt_line(uc: *mut uc_engine, a: u64, b: u64) -> Option<(usize, usize, usize)> {
    const UC_WORDS: usize = 4096 / 8;
    const CPU_WORDS: usize = 1024 / 8;
    let base = uc as usize;
    let mut seen = Vec::new();
    for (uc_word, cpu) in read_own_words(base, UC_WORDS).into_iter().enumerate() {
        let uc_cpu = 8 * uc_word;
        let Some(cpu) = cpu.filter(|p| *p != 0 && p % 8 == 0) else { continue };
        let cpu_words = read_own_words(cpu as usize, CPU_WORDS + 1);
        for (cpu_word, pair) in cpu_words.windows(2).enumerate() {
            let env_ptr = 8 * cpu_word;
            let (Some(env), Some(icount)) = (pair[0], pair[1]) else {
                continue;
            };
            if env < 16 || icount != env - 16 {
                continue;
            }
            if read_own_u64(env as usize) != Some(a) || read_own_u64(env as usize + 24) != Some(b) {
                continue;
            }
            let mut words = [0u8; 64];
            if !read_own(cpu as usize, &mut words) {
                continue;
            }
            let w = |i: usize| u32::from_le_bytes(words[4 * i..4 * i + 4].try_into().unwrap());
            seen.push((uc_cpu, env_ptr, (0..16).map(w).collect::<Vec<_>>()));
            // Another pointer in the engine may lead to a look-alike of the
            // pair (heap contents vary from run to run): keep looking.
            if w(0) != 1 || w(1) != 1 {
                continue;
            }
            let Some(cflags) = (2..15).find(|&i| w(i) == u32::MAX) else { continue };
            if w(cflags + 1) != 0 {
                continue;
            }
            return Some((uc_cpu, env_ptr, 4 * (cflags + 1)));
        }
    }
    if std::env::var_os("PVHVM_DEBUG_PROBE").is_some() {
        eprintln!("pvhvm: interrupt line candidates (uc offset, env_ptr offset, CPUState words): {seen:x?}");
    }
    None
}

thread_local! {
    /// Pages the probe's memory lookup stand-in was asked about.
    static PROBE_LOOKUPS: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

unsafe extern "C" fn probe_lookup(uc: *mut uc_engine, addr: u64) -> *mut c_void {
    PROBE_LOOKUPS.with(|l| {
        let mut v = l.take();
        v.push(addr & PAGE_MASK);
        l.set(v);
    });
    memory_lookup(uc, addr)
}

/// The probe's acknowledge page: counts acknowledges, as the vCPU's does.
struct ProbeAck {
    line: Option<InterruptLine>,
    acks: std::cell::Cell<u32>,
}

unsafe extern "C" fn probe_ack_read(uc: *mut uc_engine, offset: u64, size: std::ffi::c_uint, user: *mut c_void) -> u64 {
    let a = &*(user as *const ProbeAck);
    if offset == VMCB_INT_VECTOR && size == 4 && a.line.as_ref().is_some_and(|l| l.acknowledge()) {
        a.acks.set(a.acks.get() + 1);
        unicorn_engine::uc_emu_stop(uc);
    }
    ACK_VECTOR
}

// ---------------------------------------------------------------------------
// The probe / self-test.

static LAYOUT: OnceLock<Result<BlobLayout, String>> = OnceLock::new();

/// The blob layout for this Unicorn build, or why the workarounds do not hold.
pub fn layout() -> Result<BlobLayout, String> {
    LAYOUT.get_or_init(|| probe().map_err(|e| format!("Unicorn self-test failed: {e}"))).clone()
}

/// Written by the hook behind Rust's back: a Cell, so no read is cached.
struct ProbeHits {
    last_intr: std::cell::Cell<Option<u32>>,
}

unsafe extern "C" fn probe_intr(uc: *mut uc_engine, intno: u32, user: *mut c_void) {
    let hits = &*(user as *const ProbeHits);
    hits.last_intr.set(Some(intno));
    unicorn_engine::uc_emu_stop(uc);
}

const PROBE_CODE: u64 = 0x1000;
const PROBE_GDT: u64 = 0x3000;

fn probe() -> Result<BlobLayout, String> {
    let mut eng = Engine::new_x86_64().map_err(|e| e.to_string())?;
    let mut ram = vec![0u8; 0x10000];
    unsafe { eng.map_ptr(0, ram.len() as u64, ram.as_mut_ptr()) }.map_err(|e| e.to_string())?;
    let hits = Box::new(ProbeHits { last_intr: std::cell::Cell::new(None) });
    unsafe {
        eng.add_hook(
            HookType::INTR,
            probe_intr as *mut c_void,
            &*hits as *const ProbeHits as *mut c_void,
            None,
        )
    }
    .map_err(|e| e.to_string())?;

    // 1. Where the CPUX86State copy starts in the context allocation.
    const MAGIC_A: u64 = 0x5056_4856_4d00_a11a;
    const MAGIC_B: u64 = 0x5056_4856_4d00_b22b;
    eng.write(Reg::RAX, MAGIC_A);
    eng.write(Reg::RBX, MAGIC_B);
    let probe_ctx = Context::new(&eng, 0).map_err(|e| e.to_string())?;
    let mut probe_ctx = probe_ctx;
    probe_ctx.save(&eng).map_err(|e| e.to_string())?;
    let raw = probe_ctx.raw_bytes();
    let data_offset = (0..raw.len().saturating_sub(32))
        .step_by(8)
        .find(|&o| {
            u64::from_le_bytes(rd(raw, o)) == MAGIC_A && u64::from_le_bytes(rd(raw, o + 24)) == MAGIC_B
        })
        .ok_or("register file not found in the context blob")?;
    probe_ctx.set_data_offset(data_offset);

    // 2. The fixed offsets agree with the register API.
    eng.write(Reg::RIP, 0x1234_5678);
    eng.write(Reg::CR3, 0x7000);
    eng.write_msr(0xc000_0080, crate::mmu::EFER_LME | crate::mmu::EFER_SCE);
    eng.write_mmr(Reg::IDTR, crate::uc::Mmr { selector: 0, base: 0xabc000, limit: 0xfff, flags: 0 });
    eng.write_mmr(Reg::GDTR, crate::uc::Mmr { selector: 0, base: PROBE_GDT, limit: 0x2f, flags: 0 });
    let provisional = BlobLayout { data_offset, error_code: 0, exception_is_int: 0, old_exception: 0, no_exit_request: 0, skip_sync_pc_on_exit: 0, uc_cpu: 0, interrupt_request: 0, env_ptr: 0, vm_vmcb: 0, xcr0: 0, tsc_offset: 0, tlb_fast_below_env: 0, memory_mapping: 0 };
    let mut st = CpuState::new(&eng, provisional)?;
    st.load(&eng);
    let checks = [
        ("rip", st.rip() == 0x1234_5678),
        ("cr3", st.cr(3) == 0x7000),
        ("efer", st.efer() & (crate::mmu::EFER_LME | crate::mmu::EFER_SCE) == (crate::mmu::EFER_LME | crate::mmu::EFER_SCE)),
        ("idtr", st.idt() == (0xabc000, 0xfff)),
        ("gdtr", st.gdt() == (PROBE_GDT, 0x2f)),
        ("hflags", st.hflags() & (HF_LMA | HF_CS64) == (HF_LMA | HF_CS64) && st.cpl() == 0),
    ];
    for (name, ok) in checks {
        if !ok {
            return Err(format!("CPUX86State field '{name}' is not where expected"));
        }
    }

    // 3. Raise #GP with known error codes: find error_code and old_exception.
    // mov ax, imm16 ; mov ds, ax   (selector beyond the GDT limit: #GP(sel))
    let gp_code = |sel: u16| -> Vec<u8> {
        let [lo, hi] = sel.to_le_bytes();
        vec![0x66, 0xb8, lo, hi, 0x8e, 0xd8, 0xf4]
    };
    let baseline = {
        let mut c = Context::new(&eng, data_offset).map_err(|e| e.to_string())?;
        eng.write(Reg::RIP, PROBE_CODE);
        c.save(&eng).map_err(|e| e.to_string())?;
        c
    };
    let base_bytes = baseline.data().to_vec();
    let mut run_gp = |sel: u16, eng: &mut Engine, hits: &ProbeHits| -> Result<Vec<u8>, String> {
        ram[PROBE_CODE as usize..PROBE_CODE as usize + 7].copy_from_slice(&gp_code(sel));
        eng.flush_tb();
        let mut b = Context::new(eng, data_offset).map_err(|e| e.to_string())?;
        b.data_mut().copy_from_slice(&base_bytes);
        b.restore(eng).map_err(|e| e.to_string())?;
        hits.last_intr.set(None);
        eng.start(PROBE_CODE, 0);
        if hits.last_intr.get() != Some(13) {
            return Err(format!("expected #GP from a bad selector, got {:?}", hits.last_intr.get()));
        }
        let mut after = Context::new(eng, data_offset).map_err(|e| e.to_string())?;
        after.save(eng).map_err(|e| e.to_string())?;
        Ok(after.data().to_vec())
    };
    let a = run_gp(0x1230, &mut eng, &hits)?;
    let b = run_gp(0x2340, &mut eng, &hits)?;
    let word = |d: &[u8], o: usize| u32::from_le_bytes(rd(d, o));
    let n = a.len().min(b.len()) & !3;
    let ec: Vec<usize> = (0..n).step_by(4).filter(|&o| word(&a, o) == 0x1230 && word(&b, o) == 0x2340).collect();
    let [error_code] = ec[..] else {
        return Err(format!("error code found at {} places in the blob", ec.len()));
    };
    let old_candidates: Vec<usize> = (0..n)
        .step_by(4)
        .filter(|&o| word(&base_bytes, o) == u32::MAX && word(&b, o) == 13)
        .collect();

    // 4. A second fault without the reset becomes #DF on this build; with the
    // reset it must stay #GP. Try each candidate.
    let mut old_exception = None;
    for cand in old_candidates {
        let layout = BlobLayout { data_offset, error_code, exception_is_int: error_code + 4, old_exception: cand, no_exit_request: 0, skip_sync_pc_on_exit: 0, uc_cpu: 0, interrupt_request: 0, env_ptr: 0, vm_vmcb: 0, xcr0: 0, tsc_offset: 0, tlb_fast_below_env: 0, memory_mapping: 0 };
        let mut st = CpuState::new(&eng, layout)?;
        st.load(&eng);
        if st.old_exception() != 13 {
            continue;
        }
        st.end_exception();
        st.set_rip(PROBE_CODE);
        st.store(&eng);
        hits.last_intr.set(None);
        eng.start(PROBE_CODE, 0);
        if hits.last_intr.get() == Some(13) {
            old_exception = Some(cand);
            break;
        }
    }
    let old_exception = old_exception.ok_or("resetting old_exception does not keep a second #GP a #GP")?;
    let mut layout =
        BlobLayout {
            data_offset,
            error_code,
            exception_is_int: error_code + 4,
            old_exception,
            no_exit_request: 0,
            skip_sync_pc_on_exit: 0,
            uc_cpu: 0,
            interrupt_request: 0,
            env_ptr: 0,
            vm_vmcb: 0,
            xcr0: 0,
            tsc_offset: 0,
            tlb_fast_below_env: 0,
            memory_mapping: 0,
        };

    // 5. exception_is_int: 1 after INT n, 0 after a fault.
    ram[PROBE_CODE as usize..PROBE_CODE as usize + 3].copy_from_slice(&[0xcd, 0x41, 0xf4]);
    eng.flush_tb();
    let mut st = CpuState::new(&eng, layout)?;
    st.load(&eng);
    if st.exception_is_int() {
        return Err("exception_is_int set after a fault".into());
    }
    st.end_exception();
    st.set_rip(PROBE_CODE);
    st.store(&eng);
    hits.last_intr.set(None);
    eng.start(PROBE_CODE, 0);
    st.load(&eng);
    if hits.last_intr.get() != Some(0x41) || !st.exception_is_int() || st.rip() != PROBE_CODE + 2 {
        return Err("INT n is not reported as a software interrupt after the instruction".into());
    }

    // 6. A CPL change through the blob takes effect: in ring 3, reading CR0
    // must raise #GP(0).
    ram[PROBE_CODE as usize..PROBE_CODE as usize + 4].copy_from_slice(&[0x0f, 0x20, 0xc0, 0xf4]);
    eng.flush_tb();
    st.end_exception();
    st.set_seg(R_CS, flat_code64(0x2b, 3));
    st.set_seg(R_SS, flat_data(0x23, 3));
    st.set_rip(PROBE_CODE);
    st.sync_hflags();
    st.store(&eng);
    hits.last_intr.set(None);
    eng.start(PROBE_CODE, 0);
    st.load(&eng);
    if hits.last_intr.get() != Some(13) || st.cpl() != 3 || st.error_code() != 0 {
        return Err(format!("ring 3 through the blob did not hold (intr {:?}, cpl {})", hits.last_intr, st.cpl()));
    }
    // And back to ring 0 the same way: the same read succeeds and HLT stops.
    st.end_exception();
    st.set_seg(R_CS, flat_code64(0x08, 0));
    st.set_seg(R_SS, flat_data(0x10, 0));
    st.set_rip(PROBE_CODE);
    st.sync_hflags();
    st.store(&eng);
    hits.last_intr.set(None);
    eng.start(PROBE_CODE, 0);
    if hits.last_intr.get().is_some() || eng.read(Reg::RIP) != PROBE_CODE + 4 {
        return Err("ring 0 through the blob did not hold".into());
    }

    // 6b. XCR0: found by XSETBV setting it to x87 only, then to x87+SSE,
    // then checked both ways with XGETBV.
    const CR4_OSXSAVE: u64 = 1 << 18;
    let mut xsetbv_to = |value: u8, st: &mut CpuState, eng: &mut Engine| -> Result<Vec<u8>, String> {
        // mov eax, value ; xor edx, edx ; xor ecx, ecx ; xsetbv ; hlt
        let code = [0xb8, value, 0, 0, 0, 0x31, 0xd2, 0x31, 0xc9, 0x0f, 0x01, 0xd1, 0xf4];
        ram[PROBE_CODE as usize..PROBE_CODE as usize + code.len()].copy_from_slice(&code);
        eng.flush_tb();
        st.load(eng);
        st.end_exception();
        st.set_cr(4, st.cr(4) | CR4_OSXSAVE);
        st.set_rip(PROBE_CODE);
        st.store(eng);
        hits.last_intr.set(None);
        eng.start(PROBE_CODE, 0);
        if hits.last_intr.get().is_some() {
            return Err(format!("XSETBV raised {:?}", hits.last_intr.get()));
        }
        st.load(eng);
        Ok(st.raw_data().to_vec())
    };
    let before = xsetbv_to(1, &mut st, &mut eng)?;
    let after = xsetbv_to(3, &mut st, &mut eng)?;
    let quad = |d: &[u8], o: usize| u64::from_le_bytes(rd(d, o));
    let xcr0_candidates: Vec<usize> =
        (8..before.len().min(after.len()) - 8).step_by(8).filter(|&o| quad(&before, o) == 1 && quad(&after, o) == 3).collect();
    // xor ecx, ecx ; xgetbv ; hlt
    let xgetbv = [0x31, 0xc9, 0x0f, 0x01, 0xd0, 0xf4];
    ram[PROBE_CODE as usize..PROBE_CODE as usize + xgetbv.len()].copy_from_slice(&xgetbv);
    eng.flush_tb();
    let mut xcr0 = None;
    'cand: for cand in xcr0_candidates {
        for want in [1u64, 3] {
            st.end_exception();
            st.set_rip(PROBE_CODE);
            st.raw_data_mut()[cand..cand + 8].copy_from_slice(&want.to_le_bytes());
            st.store(&eng);
            eng.start(PROBE_CODE, 0);
            if eng.read(Reg::RAX) != want {
                continue 'cand;
            }
            st.load(&eng);
        }
        xcr0 = Some(cand);
        break;
    }
    layout.xcr0 = xcr0.ok_or("CPUX86State.xcr0 not found")?;

    // 6c. tsc_offset follows vm_vmcb (after old_exception, an int, and
    // padding): RDTSC must read the host's counter plus what is put there.
    let tsc_offset = ((old_exception + 4 + 7) & !7) + 8;
    ram[PROBE_CODE as usize..PROBE_CODE as usize + 3].copy_from_slice(&[0x0f, 0x31, 0xf4]); // rdtsc; hlt
    eng.flush_tb();
    for (offset, lifted) in [(1u64 << 62, true), (0, false)] {
        st.load(&eng);
        st.end_exception();
        st.set_rip(PROBE_CODE);
        st.raw_data_mut()[tsc_offset..tsc_offset + 8].copy_from_slice(&offset.to_le_bytes());
        st.store(&eng);
        eng.start(PROBE_CODE, 0);
        let tsc = (eng.read(Reg::RDX) << 32) | (eng.read(Reg::RAX) & 0xffff_ffff);
        if (tsc >= 1 << 62) != lifted {
            return Err("CPUX86State.tsc_offset is not where expected".into());
        }
    }
    layout.tsc_offset = tsc_offset;

    // 7. The exit check after memory accesses: with it, a stop from an MMIO
    // write lands right after the store; without it, at the end of the block.
    let cpu_context_size = unsafe { unicorn_engine::uc_context_size(eng.raw()) } - data_offset;
    layout.no_exit_request = unsafe { find_no_exit_request(eng.raw(), cpu_context_size) }
        .ok_or("uc_struct.no_exit_request not found")?;
    const PROBE_MMIO: u64 = 0x10000;
    unsafe { eng.map_mmio(PROBE_MMIO, 0x1000, Some(probe_mmio_read), Some(probe_mmio_write), std::ptr::null_mut()) }
        .map_err(|e| e.to_string())?;
    // mov [0x10000], al ; inc rbx ; inc rbx ; hlt
    let code = [0x88, 0x04, 0x25, 0x00, 0x00, 0x01, 0x00, 0x48, 0xff, 0xc3, 0x48, 0xff, 0xc3, 0xf4];
    ram[PROBE_CODE as usize..PROBE_CODE as usize + code.len()].copy_from_slice(&code);
    for checks in [true, false, true] {
        set_exit_checks(&eng, &layout, checks);
        eng.flush_tb();
        eng.write(Reg::RBX, 0);
        eng.start(PROBE_CODE, 0);
        let (rbx, want) = (eng.read(Reg::RBX), if checks { 0 } else { 2 });
        if rbx != want {
            return Err(format!("exit checks {checks}: the block went on for {rbx} of 2 instructions, expected {want}"));
        }
    }

    // 8. skip_sync_pc_on_exit: clear after a start, set by a RIP write,
    // cleared again by the next start.
    set_exit_checks(&eng, &layout, true);
    layout.skip_sync_pc_on_exit = skip_sync_pc_offset(layout.no_exit_request);
    let (uc, off) = (eng.raw(), layout.skip_sync_pc_on_exit);
    let flag = || unsafe { std::ptr::read_volatile((uc as *const u8).add(off)) };
    ram[PROBE_CODE as usize] = 0xf4;
    eng.flush_tb();
    eng.start(PROBE_CODE, 0);
    let after_start = flag();
    eng.write(Reg::RIP, PROBE_CODE);
    let after_write = flag();
    unsafe { forget_pc_write(uc, &layout) };
    let after_forget = flag();
    eng.write(Reg::RIP, PROBE_CODE);
    eng.start(PROBE_CODE, 0);
    if (after_start, after_write, after_forget, flag()) != (0, 1, 0, 0) {
        return Err("uc_struct.skip_sync_pc_on_exit is not where expected".into());
    }

    // 9. The interrupt line: find it, then check that an acknowledge comes
    // at once with IF=1, not with IF=0, and right after STI's shadow.
    set_exit_checks(&eng, &layout, false);
    eng.write(Reg::RAX, MAGIC_A);
    eng.write(Reg::RBX, MAGIC_B);
    let (uc_cpu, env_ptr, interrupt_request) =
        find_interrupt_line(eng.raw(), MAGIC_A, MAGIC_B).ok_or("QEMU's CPUState (interrupt_request) not found")?;
    layout.uc_cpu = uc_cpu;
    layout.env_ptr = env_ptr;
    layout.interrupt_request = interrupt_request;
    // vm_vmcb follows old_exception (an int, padding, then the u64).
    layout.vm_vmcb = (old_exception + 4 + 7) & !7;

    // 10. The software TLB (`SoftTlb`), found after a store from code on
    // another page (paging is off: every page is executable). The store's
    // entry must stay TLB_NOTDIRTY (the rule the vCPU works around);
    // clearing the flag must let the next store through to RAM; Unicorn's
    // tlb_reset_dirty must put it back; the code entry must name its page.
    const PROBE_DATA: u64 = 0x5000;
    // mov [0x5000], al ; hlt
    let code = [0x88, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xf4];
    ram[PROBE_CODE as usize..PROBE_CODE as usize + code.len()].copy_from_slice(&code);
    eng.flush_tb();
    eng.write(Reg::RAX, 0x5a);
    eng.start(PROBE_CODE, 0);
    let host = |gpa: u64| ram.as_ptr() as usize + gpa as usize;
    let env = read_own_u64(eng.raw() as usize + layout.uc_cpu)
        .and_then(|cpu| read_own_u64(cpu as usize + layout.env_ptr))
        .ok_or("CPUX86State not found")? as usize;
    layout.tlb_fast_below_env =
        find_tlb_fast(env, PROBE_CODE, PROBE_DATA, host(PROBE_DATA)).ok_or("QEMU's TLB tables not found")?;
    let mut tlb = unsafe { SoftTlb::new(eng.raw(), &layout) };
    let slow_at_first = unsafe { tlb.store_is_slow(PROBE_DATA) };
    let cleared = unsafe { tlb.clear_not_dirty(|page| page == PROBE_CODE) };
    let slow_after_clear = unsafe { tlb.store_is_slow(PROBE_DATA) };
    eng.write(Reg::RAX, 0xa5);
    eng.start(PROBE_CODE, 0);
    let (stored, slow_after_store) = (ram[PROBE_DATA as usize], unsafe { tlb.store_is_slow(PROBE_DATA) });
    unsafe { tlb.protect(host(PROBE_DATA)) };
    let slow_after_protect = unsafe { tlb.store_is_slow(PROBE_DATA) };
    let mut code_pages = Vec::new();
    unsafe { tlb.code_page(PROBE_CODE + 5, |gpa, host| code_pages.push((gpa, host))) };
    let seen = (slow_at_first, cleared > 0, slow_after_clear, stored, slow_after_store, slow_after_protect);
    if seen != (Some(true), true, Some(false), 0xa5, Some(false), Some(true))
        || code_pages.is_empty()
        || code_pages.iter().any(|&p| p != (PROBE_CODE, host(PROBE_CODE)))
    {
        return Err(format!("the TLB's dirty flags do not behave as expected: {seen:?}, code {code_pages:x?}"));
    }
    // 10b. uc_struct.memory_mapping: a stand-in sees the store's page, and
    // clearing the entry from there lets the next store take the fast path.
    layout.memory_mapping = find_memory_mapping_field(eng.raw(), layout.no_exit_request).ok_or("uc_struct.memory_mapping not found")?;
    unsafe { tlb.protect(host(PROBE_DATA)) };
    PROBE_LOOKUPS.with(|l| l.set(Vec::new()));
    unsafe { watch_memory_lookups(eng.raw(), &layout, Some(probe_lookup)) };
    eng.start(PROBE_CODE, 0);
    let slow_before_clear = unsafe { tlb.store_is_slow(PROBE_DATA) };
    let cleared = unsafe { tlb.clear_page(PROBE_DATA) };
    unsafe { watch_memory_lookups(eng.raw(), &layout, None) };
    let looked_up = PROBE_LOOKUPS.with(|l| l.take());
    if !looked_up.contains(&PROBE_DATA) || slow_before_clear != Some(true) || cleared == 0 || unsafe { tlb.store_is_slow(PROBE_DATA) } != Some(false) {
        return Err(format!("the memory lookup stand-in: lookups {looked_up:x?}, slow {slow_before_clear:?}, cleared {cleared}"));
    }
    // 10c. A new block makes Unicorn put the flag back on its page's
    // entries (the walk `skip_block_walks` avoids), unless a fetch-unmapped
    // hook covers the block; `protect_block` does the walk itself.
    ram[PROBE_DATA as usize] = 0xf4; // hlt
    let block_walked = |eng: &mut Engine, ours: bool| -> Option<bool> {
        unsafe { tlb.clear_page(PROBE_DATA) };
        if unsafe { tlb.store_is_slow(PROBE_DATA) } != Some(false) {
            return None;
        }
        eng.flush_tb();
        eng.start(PROBE_DATA, 0);
        if ours {
            unsafe { tlb.protect_block(PROBE_DATA, 1) };
        }
        unsafe { tlb.store_is_slow(PROBE_DATA) }
    };
    let unhooked = block_walked(&mut eng, false);
    let hook = unsafe { skip_block_walks(&mut eng, PROBE_DATA, PROBE_DATA + 0xfff) }.map_err(|e| e.to_string())?;
    let (hooked, by_us) = (block_walked(&mut eng, false), block_walked(&mut eng, true));
    eng.remove_hook(hook);
    if (unhooked, hooked, by_us) != (Some(true), Some(false), Some(true)) {
        return Err(format!("the TLB walk of a new block: unhooked {unhooked:?}, hooked {hooked:?}, ours {by_us:?}"));
    }
    const PROBE_ACK: u64 = 0x20000;
    let ack = Box::new(ProbeAck { line: None, acks: std::cell::Cell::new(0) });
    unsafe {
        eng.map_mmio(PROBE_ACK, 0x1000, Some(probe_ack_read), None, &*ack as *const ProbeAck as *mut c_void)
    }
    .map_err(|e| e.to_string())?;
    let ack = Box::into_raw(ack);
    let result = (|| -> Result<(), String> {
        let line = unsafe { InterruptLine::new(eng.raw(), &layout) };
        let mut st = CpuState::new(&eng, layout)?;
        st.load(&eng);
        if st.u64_at(layout.vm_vmcb) != 0 {
            return Err("CPUX86State.vm_vmcb is not where expected".into());
        }
        st.set_vm_vmcb(PROBE_ACK);
        st.store(&eng);
        unsafe { (*ack).line = Some(InterruptLine::new(eng.raw(), &layout)) };
        // 0x1000: inc rcx; hlt    0x1004: sti; nop; inc rcx; hlt
        let code = [0x48, 0xff, 0xc1, 0xf4, 0xfb, 0x90, 0x48, 0xff, 0xc1, 0xf4];
        ram[PROBE_CODE as usize..PROBE_CODE as usize + code.len()].copy_from_slice(&code);
        eng.flush_tb();
        let run = |eng: &mut Engine, rflags: u64, at: u64, raise: bool| -> (u32, Option<u32>, u64, u64) {
            eng.write(Reg::RCX, 0);
            eng.write(Reg::RFLAGS, rflags);
            if raise {
                line.raise();
            }
            unsafe { (*ack).acks.set(0) };
            hits.last_intr.set(None);
            eng.start(at, 0);
            (unsafe { (*ack).acks.get() }, hits.last_intr.get(), eng.read(Reg::RIP), eng.read(Reg::RCX))
        };
        let fresh = |eng: &Engine, st: &mut CpuState| {
            st.load(eng);
            st.end_exception();
            st.store(eng);
        };
        let (acks, intr, rip, rcx) = run(&mut eng, 0x202, PROBE_CODE, true);
        st.load(&eng);
        if (acks, intr, rip, rcx, st.error_code()) != (1, Some(13), PROBE_CODE, 0, ACK_ERROR_CODE) || line.lower() {
            return Err(format!("IF=1: acknowledge {acks}, exception {intr:?}, rip {rip:#x}, rcx {rcx}"));
        }
        fresh(&eng, &mut st);
        let (acks, _, rip, rcx) = run(&mut eng, 0x2, PROBE_CODE, true);
        if (acks, rip, rcx) != (0, PROBE_CODE + 4, 1) || !line.lower() {
            return Err(format!("IF=0: acknowledge {acks}, rip {rip:#x}, rcx {rcx}"));
        }
        line.raise();
        let (acks, _, rip, rcx) = run(&mut eng, 0x2, PROBE_CODE + 4, false);
        if (acks, rip, rcx) != (1, PROBE_CODE + 6, 0) {
            return Err(format!("STI: acknowledge {acks}, rip {rip:#x} (want {:#x}), rcx {rcx}", PROBE_CODE + 6));
        }
        Ok(())
    })();
    drop(eng);
    unsafe { drop(Box::from_raw(ack)) };
    result.map_err(|e| format!("the interrupt line: {e}"))?;
    drop(ram);
    Ok(layout)
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_holds_on_this_build() {
        let l = super::layout().expect("self-test");
        assert!(l.data_offset > 0);
        assert!(l.error_code > 592);
        assert!(l.old_exception > l.error_code);
    }
}
