//! A thin, raw handle on one Unicorn x86-64 engine.
//!
//! The safe `unicorn_engine::Unicorn` wraps hooks in boxed closures behind an
//! `Rc`; the vCPU wants plain `extern "C"` callbacks with a stable pointer to
//! its own state, and byte access to the saved CPU context (see
//! `unicorn_gaps`). So this module speaks to the C API directly and keeps the
//! `unsafe` in one place.

use std::ffi::{c_int, c_void, CStr};
use std::ptr;

use unicorn_engine as ucs;
use unicorn_engine::{uc_engine, uc_error, uc_hook, Arch, HookType, Mode, RegisterX86, X86Insn};

pub type Reg = RegisterX86;

#[derive(Debug, Clone, thiserror::Error)]
#[error("unicorn: {0}")]
pub struct UcError(pub String);

pub fn check(err: uc_error) -> Result<(), UcError> {
    if err == uc_error::OK {
        Ok(())
    } else {
        Err(UcError(strerror(err)))
    }
}

pub fn strerror(err: uc_error) -> String {
    // SAFETY: uc_strerror returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(ucs::uc_strerror(err)) }.to_string_lossy().into_owned()
}

/// Segment/table register as Unicorn's `uc_x86_mmr`.
pub use unicorn_engine::uc_x86_mmr as Mmr;

/// `UC_CTL(type, nr_args, UC_CTL_IO_WRITE)` from unicorn.h.
fn ctl_write(kind: ucs::ControlType, nr_args: u32) -> ucs::ControlType {
    ucs::ControlType(kind.0 | (nr_args << 26) | (1 << 30))
}

/// Register access from inside a hook, where only the raw handle is at hand.
///
/// # Safety
/// `uc` must be a live engine; `reg` a register of at most 64 bits.
#[inline]
pub unsafe fn raw_read(uc: *mut uc_engine, reg: Reg) -> u64 {
    let mut v: u64 = 0;
    ucs::uc_reg_read(uc, reg as c_int, &mut v as *mut u64 as *mut c_void);
    v
}

/// # Safety
/// As `raw_read`.
#[inline]
pub unsafe fn raw_write(uc: *mut uc_engine, reg: Reg, value: u64) {
    let v = value;
    ucs::uc_reg_write(uc, reg as c_int, &v as *const u64 as *const c_void);
}

/// # Safety
/// `uc` must be a live engine.
pub unsafe fn raw_read_msr(uc: *mut uc_engine, index: u32) -> u64 {
    let mut m = ucs::uc_x86_msr { rid: index, value: 0 };
    ucs::uc_reg_read(uc, Reg::MSR as c_int, &mut m as *mut _ as *mut c_void);
    m.value
}

/// # Safety
/// `uc` must be a live engine.
pub unsafe fn raw_stop(uc: *mut uc_engine) {
    ucs::uc_emu_stop(uc);
}

pub struct Engine {
    handle: *mut uc_engine,
    hooks: Vec<uc_hook>,
}

impl Engine {
    pub fn new_x86_64() -> Result<Self, UcError> {
        let mut handle = ptr::null_mut();
        // SAFETY: plain FFI call with an out-pointer.
        check(unsafe { ucs::uc_open(Arch::X86, Mode::MODE_64, &mut handle) })?;
        Ok(Self { handle, hooks: Vec::new() })
    }

    /// A handle that owns nothing (what a dropped engine is replaced by).
    pub fn closed() -> Self {
        Self { handle: ptr::null_mut(), hooks: Vec::new() }
    }

    pub fn raw(&self) -> *mut uc_engine {
        self.handle
    }

    /// Map host memory into the guest-physical space.
    ///
    /// # Safety
    /// `host` must stay valid and unmoved for `size` bytes while mapped.
    pub unsafe fn map_ptr(&mut self, gpa: u64, size: u64, host: *mut u8) -> Result<(), UcError> {
        check(ucs::uc_mem_map_ptr(self.handle, gpa, size, ucs::Prot::ALL.0, host as *mut c_void))
    }

    /// Map an MMIO range served by callbacks.
    ///
    /// # Safety
    /// `user` must outlive the engine; the callbacks must have Unicorn's
    /// MMIO signatures.
    pub unsafe fn map_mmio(
        &mut self,
        gpa: u64,
        size: u64,
        read: ucs::uc_cb_mmio_read_t,
        write: ucs::uc_cb_mmio_write_t,
        user: *mut c_void,
    ) -> Result<(), UcError> {
        check(ucs::uc_mmio_map(self.handle, gpa, size, read, user, write, user))
    }

    pub fn unmap(&mut self, gpa: u64, size: u64) -> Result<(), UcError> {
        check(unsafe { ucs::uc_mem_unmap(self.handle, gpa, size) })
    }

    #[inline]
    pub fn read(&self, reg: Reg) -> u64 {
        unsafe { raw_read(self.handle, reg) }
    }

    #[inline]
    pub fn write(&self, reg: Reg, value: u64) {
        unsafe { raw_write(self.handle, reg, value) }
    }

    pub fn read_mmr(&self, reg: Reg) -> Mmr {
        let mut m = Mmr { selector: 0, base: 0, limit: 0, flags: 0 };
        unsafe { ucs::uc_reg_read(self.handle, reg as c_int, &mut m as *mut Mmr as *mut c_void) };
        m
    }

    pub fn write_mmr(&self, reg: Reg, m: Mmr) {
        unsafe { ucs::uc_reg_write(self.handle, reg as c_int, &m as *const Mmr as *const c_void) };
    }

    /// A register wider than 64 bits (x87 80-bit, XMM) as its bytes.
    pub fn read_bytes(&self, reg: Reg, out: &mut [u8]) {
        unsafe { ucs::uc_reg_read(self.handle, reg as c_int, out.as_mut_ptr() as *mut c_void) };
    }

    /// `bytes` must be the register's whole width.
    pub fn write_bytes(&self, reg: Reg, bytes: &[u8]) {
        unsafe { ucs::uc_reg_write(self.handle, reg as c_int, bytes.as_ptr() as *const c_void) };
    }

    pub fn read_msr(&self, index: u32) -> u64 {
        unsafe { raw_read_msr(self.handle, index) }
    }

    pub fn write_msr(&self, index: u32, value: u64) {
        let m = ucs::uc_x86_msr { rid: index, value };
        unsafe { ucs::uc_reg_write(self.handle, Reg::MSR as c_int, &m as *const _ as *const c_void) };
    }

    /// Run from `begin` until a hook stops the engine, HLT, or an error.
    /// `count` > 0 single-steps that many instructions (tests, probes only).
    pub fn start(&mut self, begin: u64, count: usize) -> uc_error {
        // until = 0: Unicorn translates `until - 1` through the guest page
        // tables, and a bad `until` makes every start return at once.
        unsafe { ucs::uc_emu_start(self.handle, begin, 0, 0, count) }
    }

    pub fn stop(&self) {
        unsafe { ucs::uc_emu_stop(self.handle) };
    }

    /// Register a hook on all addresses. `extra` is the instruction id for
    /// `HookType::INSN`.
    ///
    /// # Safety
    /// `callback` must have the C signature Unicorn expects for `kind`, and
    /// `user_data` must outlive the engine.
    pub unsafe fn add_hook(
        &mut self,
        kind: HookType,
        callback: *mut c_void,
        user_data: *mut c_void,
        extra: Option<X86Insn>,
    ) -> Result<uc_hook, UcError> {
        let mut h: uc_hook = 0 as uc_hook;
        let err = match extra {
            Some(insn) => ucs::uc_hook_add(
                self.handle, &mut h, kind.0 as c_int, callback, user_data, 1, 0, insn as c_int,
            ),
            None => ucs::uc_hook_add(self.handle, &mut h, kind.0 as c_int, callback, user_data, 1, 0),
        };
        check(err)?;
        self.hooks.push(h);
        Ok(h)
    }

    /// A hook for addresses in `[begin, end]` only (Unicorn decides at
    /// translation time, so blocks outside the range carry no call at all).
    ///
    /// # Safety
    /// As `add_hook`.
    pub unsafe fn add_hook_range(
        &mut self,
        kind: HookType,
        callback: *mut c_void,
        user_data: *mut c_void,
        begin: u64,
        end: u64,
    ) -> Result<uc_hook, UcError> {
        let mut h: uc_hook = 0 as uc_hook;
        check(ucs::uc_hook_add(self.handle, &mut h, kind.0 as c_int, callback, user_data, begin, end))?;
        self.hooks.push(h);
        Ok(h)
    }

    pub fn remove_hook(&mut self, h: uc_hook) {
        unsafe { ucs::uc_hook_del(self.handle, h) };
        self.hooks.retain(|x| *x != h);
    }

    /// Drop translated code for `[begin, end)`, addresses as the guest ran
    /// them (after a host write into a page that may hold code).
    pub fn remove_cache(&mut self, begin: u64, end: u64) {
        unsafe {
            ucs::uc_ctl(
                self.handle,
                ctl_write(ucs::ControlType::TB_REMOVE_CACHE, 2),
                begin,
                end,
            )
        };
    }

    /// Stop before executing any instruction at these linear addresses
    /// (Unicorn's exits: checked when code is translated, so translated
    /// code must be flushed after a change). An empty set turns exits off.
    pub fn set_exits(&mut self, exits: &[u64]) -> Result<(), UcError> {
        let on = !exits.is_empty() as c_int;
        check(unsafe { ucs::uc_ctl(self.handle, ctl_write(ucs::ControlType::UC_USE_EXITS, 1), on) })?;
        if exits.is_empty() {
            return Ok(());
        }
        check(unsafe {
            ucs::uc_ctl(self.handle, ctl_write(ucs::ControlType::UC_EXITS, 2), exits.as_ptr(), exits.len())
        })
    }

    pub fn flush_tb(&mut self) {
        unsafe {
            ucs::uc_ctl(
                self.handle,
                ctl_write(ucs::ControlType::TB_FLUSH, 0),
            )
        };
    }

    pub fn flush_tlb(&mut self) {
        unsafe {
            ucs::uc_ctl(
                self.handle,
                ctl_write(ucs::ControlType::TLB_FLUSH, 0),
            )
        };
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            unsafe { ucs::uc_close(self.handle) };
            self.handle = ptr::null_mut();
        }
    }
}

/// A saved CPU context: Unicorn's `uc_context` header followed by a byte copy
/// of QEMU's `CPUX86State` up to `end_reset_fields`. `unicorn_gaps` knows
/// where the fields we need live inside it.
pub struct Context {
    ctx: *mut ucs::uc_context,
    data_offset: usize,
    len: usize,
}

impl Context {
    pub fn new(engine: &Engine, data_offset: usize) -> Result<Self, UcError> {
        let mut ctx = ptr::null_mut();
        check(unsafe { ucs::uc_context_alloc(engine.handle, &mut ctx) })?;
        let len = unsafe { ucs::uc_context_size(engine.handle) };
        Ok(Self { ctx, data_offset, len })
    }

    pub fn save(&mut self, engine: &Engine) -> Result<(), UcError> {
        check(unsafe { ucs::uc_context_save(engine.handle, self.ctx) })
    }

    /// Save from inside a hook, where only the raw handle is at hand.
    ///
    /// # Safety
    /// `uc` must be the engine this context was allocated for.
    pub unsafe fn save_raw(&mut self, uc: *mut uc_engine) -> Result<(), UcError> {
        check(ucs::uc_context_save(uc, self.ctx))
    }

    pub fn restore(&mut self, engine: &Engine) -> Result<(), UcError> {
        check(unsafe { ucs::uc_context_restore(engine.handle, self.ctx) })
    }

    /// The whole allocation, header included (used once to find the header size).
    pub fn raw_bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ctx as *const u8, self.len) }
    }

    pub fn set_data_offset(&mut self, off: usize) {
        self.data_offset = off;
    }

    pub fn data(&self) -> &[u8] {
        &self.raw_bytes()[self.data_offset..]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        let all = unsafe { std::slice::from_raw_parts_mut(self.ctx as *mut u8, self.len) };
        &mut all[self.data_offset..]
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if !self.ctx.is_null() {
            unsafe { ucs::uc_context_free(self.ctx) };
        }
    }
}
