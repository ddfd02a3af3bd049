//! The Python face of the core (`pvhvm._core`): thin wrappers, no logic.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::domain::Domain;
use crate::hypercall::TraceEntry;
use crate::memory::GuestRam;
use crate::vcpu::VcpuExit;

create_exception!(_core, CoreError, PyException, "The hypervisor core refused or failed.");
create_exception!(_core, GrantError, CoreError, "A grant reference the device model may not use (GNTST_* name).");

fn grant_err(e: crate::xen::gnttab::GrantError) -> PyErr {
    GrantError::new_err((e.name(), e.status()))
}

fn core_err(e: impl std::fmt::Display) -> PyErr {
    CoreError::new_err(e.to_string())
}

/// Guest RAM as a writable buffer (`memoryview(vm.memory)`), zero-copy.
/// Offsets are host-buffer offsets; `Vm.ram_regions()` maps them to
/// guest-physical addresses.
#[pyclass(frozen, module = "pvhvm._core")]
pub struct GuestMemory {
    ram: Arc<GuestRam>,
}

/// Export `len` bytes of guest RAM at `ptr` through the buffer protocol,
/// kept alive by `owner` (which holds the RAM's `Arc`).
///
/// # Safety
/// `view` comes from Python's buffer protocol; `ptr..ptr+len` is guest RAM.
unsafe fn fill_buffer(
    py: Python<'_>,
    owner: *mut ffi::PyObject,
    view: *mut ffi::Py_buffer,
    ptr: *mut u8,
    len: u64,
    readonly: bool,
    flags: c_int,
) -> PyResult<()> {
    let ret = ffi::PyBuffer_FillInfo(
        view,
        owner,
        ptr as *mut c_void,
        len as ffi::Py_ssize_t,
        readonly as c_int,
        flags,
    );
    if ret == -1 {
        return Err(PyErr::fetch(py));
    }
    Ok(())
}

#[pymethods]
impl GuestMemory {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let ram = &slf.get().ram;
        fill_buffer(slf.py(), slf.as_ptr(), view, ram.host_ptr(), ram.size(), false, flags)
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.ram.size() as usize
    }
}

/// A granted page (or v2 sub-page window) mapped for a device model: a
/// buffer over guest RAM, writable if mapped so. `Vm.grant_unmap` ends it.
#[pyclass(module = "pvhvm._core")]
pub struct GrantMapping {
    ram: Arc<GuestRam>,
    #[pyo3(get)]
    gref: u32,
    #[pyo3(get)]
    writable: bool,
    gpa: u64,
    len: u64,
    live: bool,
}

#[pymethods]
impl GrantMapping {
    unsafe fn __getbuffer__(slf: PyRef<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if !slf.live {
            return Err(GrantError::new_err(("unmapped", -5i16)));
        }
        let s = slf.ram.slice_mut(slf.gpa, slf.len).map_err(core_err)?;
        fill_buffer(slf.py(), slf.as_ptr(), view, s.as_mut_ptr(), slf.len, !slf.writable, flags)
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len as usize
    }
}

/// Why `Vm.run()` returned. `kind` is one of: shutdown, console, notify,
/// kicked, idle, halted, triple_fault, error.
#[pyclass(frozen, get_all, module = "pvhvm._core")]
pub struct Exit {
    kind: &'static str,
    reason: Option<u32>,
    deadline_ns: Option<u64>,
    interrupts_enabled: Option<bool>,
    chain: Vec<u8>,
    message: Option<String>,
}

#[pymethods]
impl Exit {
    fn __repr__(&self) -> String {
        format!(
            "Exit(kind={:?}, reason={:?}, deadline_ns={:?}, interrupts_enabled={:?}, chain={:?}, message={:?})",
            self.kind, self.reason, self.deadline_ns, self.interrupts_enabled, self.chain, self.message
        )
    }
}

impl From<VcpuExit> for Exit {
    fn from(e: VcpuExit) -> Self {
        let mut x =
            Exit { kind: "", reason: None, deadline_ns: None, interrupts_enabled: None, chain: vec![], message: None };
        match e {
            VcpuExit::Shutdown { reason } => {
                x.kind = "shutdown";
                x.reason = Some(reason);
            }
            VcpuExit::ConsoleOutput => x.kind = "console",
            VcpuExit::Notify => x.kind = "notify",
            VcpuExit::Kicked => x.kind = "kicked",
            VcpuExit::Idle { deadline_ns } => {
                x.kind = "idle";
                x.deadline_ns = deadline_ns;
            }
            VcpuExit::Halted { interrupts_enabled } => {
                x.kind = "halted";
                x.interrupts_enabled = Some(interrupts_enabled);
            }
            VcpuExit::TripleFault { chain } => {
                x.kind = "triple_fault";
                x.chain = chain;
            }
            VcpuExit::Error { message } => {
                x.kind = "error";
                x.message = Some(message);
            }
        }
        x
    }
}

type TraceTuple = (u32, u64, (u64, u64, u64, u64, u64), i64, u64);

fn trace_tuple(e: &TraceEntry) -> TraceTuple {
    let a = e.args;
    (e.vcpu, e.nr, (a[0], a[1], a[2], a[3], a[4]), e.result, e.time_ns)
}

/// Lets the run loop leave the GIL: while it runs, the `Vm` is mutably
/// borrowed, so no other thread can reach the domain.
struct DomainPtr(*mut Domain);
unsafe impl Send for DomainPtr {}
impl DomainPtr {
    fn get(&self) -> *mut Domain {
        self.0
    }
}

/// One domain: RAM, vCPU 0 and Xen's state. Built and driven by `pvhvm.Domain`.
#[pyclass(module = "pvhvm._core")]
pub struct Vm {
    domain: Domain,
}

// SAFETY: PyO3's borrow flag lets one thread at a time use the Vm, and
// nothing in it is tied to a thread: a Unicorn engine may be driven (and
// closed) from any thread as long as only one does at a time, and the
// ticker thread shares only its own synchronised state. So the Vm may be
// used from, and dropped on, whichever thread holds the last reference.
unsafe impl Send for Vm {}
// SAFETY: only `run` (which takes `&mut self`) leaves the GIL; every `&self`
// method holds it throughout, so shared use is serialised by the GIL.
unsafe impl Sync for Vm {}

#[pymethods]
impl Vm {
    #[new]
    #[pyo3(signature = (memory_bytes, domid = 1, uuid = None))]
    fn new(memory_bytes: u64, domid: u32, uuid: Option<&[u8]>) -> PyResult<Self> {
        let mut u = [0u8; 16];
        if let Some(b) = uuid {
            if b.len() != 16 {
                return Err(PyValueError::new_err("uuid must be 16 bytes"));
            }
            u.copy_from_slice(b);
        }
        Ok(Self { domain: Domain::new(memory_bytes, domid, u).map_err(core_err)? })
    }

    #[getter]
    fn memory(&self) -> GuestMemory {
        GuestMemory { ram: self.domain.ram.clone() }
    }

    /// [(guest-physical start, length, host offset)] of every RAM region.
    fn ram_regions(&self) -> Vec<(u64, u64, u64)> {
        self.domain.ram.regions().iter().map(|r| (r.gpa, r.len, r.host_offset)).collect()
    }

    /// Copy `data` (bytes or any contiguous buffer, e.g. a memoryview of a
    /// mapped file: no intermediate copy) into guest RAM at `gpa`.
    fn write_phys(&self, py: Python<'_>, gpa: u64, data: pyo3::buffer::PyBuffer<u8>) -> PyResult<()> {
        let s = self.domain.ram.slice_mut(gpa, data.item_count() as u64).map_err(core_err)?;
        data.copy_to_slice(py, s)
    }

    fn read_phys<'py>(&self, py: Python<'py>, gpa: u64, length: u64) -> PyResult<Bound<'py, PyBytes>> {
        let s = self.domain.ram.slice(gpa, length).map_err(core_err)?;
        Ok(PyBytes::new(py, s))
    }

    /// Read guest-linear memory through vCPU `vcpu`'s page tables.
    #[pyo3(signature = (va, length, vcpu = 0))]
    fn read_linear<'py>(&self, py: Python<'py>, va: u64, length: usize, vcpu: usize) -> PyResult<Bound<'py, PyBytes>> {
        let v = self.domain.vcpus.get(vcpu).ok_or_else(|| PyValueError::new_err("no such vCPU"))?;
        let mut buf = vec![0u8; length];
        v.read_linear(va, &mut buf).map_err(|e| core_err(format!("{e:?}")))?;
        Ok(PyBytes::new(py, &buf))
    }

    fn set_pvh_entry(&mut self, entry: u64, start_info: u64) -> PyResult<()> {
        self.domain.vcpus[0].set_pvh_entry(entry, start_info).map_err(core_err)
    }

    /// Run the guest until the host is needed. Releases the GIL meanwhile.
    fn run(&mut self, py: Python<'_>) -> Exit {
        let p = DomainPtr(&mut self.domain);
        let exit = py.allow_threads(move || unsafe { (*p.get()).run() });
        exit.into()
    }

    fn take_console_output<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let out = std::mem::take(&mut self.domain.xen.console_out);
        PyBytes::new(py, &out)
    }

    fn push_console_input(&mut self, data: &[u8]) {
        self.domain.xen.console_in.extend(data.iter().copied());
    }

    #[getter]
    fn get_tracing(&self) -> bool {
        self.domain.xen.log.tracing
    }

    #[setter]
    fn set_tracing(&mut self, on: bool) {
        self.domain.xen.log.tracing = on;
    }

    /// Drain the hypercall trace: [(vcpu, nr, (a0..a4), result, time_ns)].
    fn take_trace(&mut self) -> Vec<TraceTuple> {
        self.domain.xen.log.take_trace().iter().map(trace_tuple).collect()
    }

    /// The last hypercalls (kept even with tracing off).
    fn recent_hypercalls(&self) -> Vec<TraceTuple> {
        self.domain.xen.log.recent().iter().map(trace_tuple).collect()
    }

    /// {hypercall number: calls so far}
    fn hypercall_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (nr, &n) in self.domain.xen.log.counts.iter().enumerate() {
            if n > 0 {
                d.set_item(nr, n)?;
            }
        }
        Ok(d)
    }

    #[pyo3(signature = (vcpu = 0))]
    fn registers<'py>(&mut self, py: Python<'py>, vcpu: usize) -> PyResult<Bound<'py, PyDict>> {
        let v = self.domain.vcpus.get_mut(vcpu).ok_or_else(|| PyValueError::new_err("no such vCPU"))?;
        let d = PyDict::new(py);
        for (k, val) in v.registers() {
            d.set_item(k, val)?;
        }
        Ok(d)
    }

    #[getter]
    fn exceptions_delivered(&self) -> u64 {
        self.domain.vcpus.iter().map(|v| v.exceptions_delivered).sum()
    }

    /// Times all translated code was thrown away (reset, hypercall page,
    /// single steps); each costs retranslating whatever runs next.
    #[getter]
    fn code_cache_flushes(&self) -> u64 {
        self.domain.vcpus.iter().map(|v| v.code_cache_flushes).sum()
    }

    #[getter]
    fn shutdown_code(&self) -> Option<u32> {
        self.domain.xen.shutdown_code
    }

    fn system_time_ns(&self) -> u64 {
        self.domain.xen.system_time_ns()
    }

    /// The E820 map XENMEM_memory_map hands out: [(addr, size, type)].
    fn set_memory_map(&mut self, entries: Vec<(u64, u64, u32)>) {
        self.domain.xen.memory_map = entries;
    }

    /// Set an HVM parameter, as the toolstack does (STORE_PFN, CONSOLE_EVTCHN …).
    fn set_hvm_param(&mut self, index: usize, value: u64) -> PyResult<()> {
        let slot = self.domain.xen.hvm_params.get_mut(index).ok_or_else(|| PyValueError::new_err("no such HVM param"))?;
        *slot = value;
        Ok(())
    }

    fn get_hvm_param(&self, index: usize) -> PyResult<u64> {
        self.domain.xen.hvm_params.get(index).copied().ok_or_else(|| PyValueError::new_err("no such HVM param"))
    }

    /// A guest event channel port whose far end is the host (a device model).
    fn bind_host_port(&mut self) -> PyResult<u32> {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        let ev = &mut self.domain.xen.evtchn;
        let port = ev.alloc(PortState::Unbound { remote: DOMID_HOST }, 0).map_err(|e| core_err(format!("{e:?}")))?;
        ev.set_state(port, PortState::Interdomain { remote: DOMID_HOST, remote_port: port })
            .map_err(|e| core_err(format!("{e:?}")))?;
        Ok(port)
    }

    /// Bind the host end of a port the guest allocated for the host
    /// (EVTCHNOP_alloc_unbound with remote domain 0), as a backend does.
    fn bind_guest_port(&mut self, port: u32) -> PyResult<()> {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        let ev = &mut self.domain.xen.evtchn;
        match ev.get(port).map(|p| p.state) {
            Some(PortState::Unbound { remote: DOMID_HOST }) => ev
                .set_state(port, PortState::Interdomain { remote: DOMID_HOST, remote_port: port })
                .map_err(|e| core_err(format!("{e:?}"))),
            _ => Err(core_err(format!("port {port} is not waiting for the host"))),
        }
    }

    /// Ports the guest notified since the last call.
    fn take_notifications(&mut self) -> Vec<u32> {
        self.domain.xen.host_notifications.drain(..).collect()
    }

    /// Raise a guest port from the host side. False if the port is not the host's.
    fn notify_guest(&mut self, port: u32) -> bool {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        match self.domain.xen.evtchn.get(port).map(|p| p.state) {
            Some(PortState::Interdomain { remote: DOMID_HOST, .. }) => {
                self.domain.xen.raise(port);
                true
            }
            _ => false,
        }
    }

    /// Copy `length` bytes at `offset` out of the page the guest granted
    /// with `gref` to domain `domid` (0, the host). GrantError if refused.
    #[pyo3(signature = (gref, offset, length, domid = 0))]
    fn grant_read<'py>(&self, py: Python<'py>, gref: u32, offset: u64, length: usize, domid: u16) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; length];
        self.domain.xen.gnttab.read(&self.domain.ram, gref, domid, offset, &mut buf).map_err(grant_err)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Copy `data` into a granted page at `offset` (the grant must be writable).
    #[pyo3(signature = (gref, offset, data, domid = 0))]
    fn grant_write(&self, gref: u32, offset: u64, data: &[u8], domid: u16) -> PyResult<()> {
        self.domain.xen.gnttab.write(&self.domain.ram, gref, domid, offset, data).map_err(grant_err)
    }

    /// Map a granted page for a device model; the guest sees it in use
    /// (GTF_reading/GTF_writing) until `grant_unmap`.
    #[pyo3(signature = (gref, writable = false, domid = 0))]
    fn grant_map(&mut self, gref: u32, writable: bool, domid: u16) -> PyResult<GrantMapping> {
        let ram = self.domain.ram.clone();
        let g = self.domain.xen.gnttab.map(&ram, gref, domid, writable).map_err(grant_err)?;
        Ok(GrantMapping { ram, gref, writable, gpa: g.gpa, len: g.len, live: true })
    }

    fn grant_unmap(&mut self, mut mapping: PyRefMut<'_, GrantMapping>) -> PyResult<()> {
        if !mapping.live {
            return Err(GrantError::new_err(("GNTST_bad_handle", -5i16)));
        }
        mapping.live = false;
        self.domain.xen.gnttab.unmap(&self.domain.ram, mapping.gref, mapping.writable).map_err(grant_err)
    }

    /// (version, shared frames placed, status frames placed)
    fn grant_table_info(&self) -> (u32, usize, usize) {
        let g = &self.domain.xen.gnttab;
        (g.version, g.frames.iter().flatten().count(), g.status_frames.iter().flatten().count())
    }

    /// A thread-safe handle that stops `run()` soon (returns `kicked`).
    fn kicker(&self) -> Kicker {
        Kicker { inner: self.domain.vcpus[0].kicker() }
    }

    /// `run()` returns `kicked` at least this often (ms).
    #[setter]
    fn set_time_slice_ms(&mut self, ms: u64) {
        for v in &mut self.domain.vcpus {
            v.time_slice = std::time::Duration::from_millis(ms.max(1));
        }
    }

    #[getter]
    fn interrupts_delivered(&self) -> u64 {
        self.domain.vcpus.iter().map(|v| v.interrupts_delivered).sum()
    }
}

/// Stops a running `Vm.run()` from another thread.
#[pyclass(frozen, module = "pvhvm._core")]
pub struct Kicker {
    inner: crate::ticker::Kicker,
}

#[pymethods]
impl Kicker {
    fn kick(&self) {
        self.inner.kick();
    }
}

/// Run the Unicorn self-test; returns the context-blob offsets it found.
#[pyfunction]
fn self_test(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let l = crate::unicorn_gaps::layout().map_err(core_err)?;
    let d = PyDict::new(py);
    d.set_item("data_offset", l.data_offset)?;
    d.set_item("error_code", l.error_code)?;
    d.set_item("exception_is_int", l.exception_is_int)?;
    d.set_item("old_exception", l.old_exception)?;
    Ok(d)
}

/// The host's time-stamp counter (the guest reads the same one).
#[pyfunction]
fn host_tsc() -> u64 {
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Vm>()?;
    m.add_class::<Exit>()?;
    m.add_class::<GuestMemory>()?;
    m.add_class::<Kicker>()?;
    m.add_class::<GrantMapping>()?;
    m.add("GrantError", m.py().get_type::<GrantError>())?;
    m.add_function(wrap_pyfunction!(self_test, m)?)?;
    m.add_function(wrap_pyfunction!(host_tsc, m)?)?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add("XEN_VERSION", (crate::cpuid::XEN_MAJOR, crate::cpuid::XEN_MINOR))?;
    m.add("PAGE_SIZE", crate::layout::PAGE_SIZE)?;
    m.add("MMIO_HOLE_START", crate::layout::MMIO_HOLE_START)?;
    m.add("HIGH_RAM_START", crate::layout::HIGH_RAM_START)?;
    m.add("MAX_RAM", crate::layout::MAX_RAM)?;
    m.add("BOOT_GDT", crate::layout::BOOT_GDT)?;
    m.add("BOOT_INFO_START", crate::layout::BOOT_INFO_START)?;
    m.add("ACPI_SLEEP_CONTROL_PORT", crate::layout::ACPI_SLEEP_CONTROL_PORT)?;
    m.add("ACPI_SLEEP_STATUS_PORT", crate::layout::ACPI_SLEEP_STATUS_PORT)?;
    m.add("ACPI_SLP_TYP_S5", crate::layout::ACPI_SLP_TYP_S5)?;
    m.add("RESET_CONTROL_PORT", crate::layout::RESET_CONTROL_PORT)?;
    m.add("RESET_VALUE", crate::layout::RESET_VALUE)?;
    Ok(())
}
