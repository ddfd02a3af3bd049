//! The Python face of the core (`pvhvm._core`): thin wrappers, no logic.

use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::domain::Domain;
use crate::exit::ExitReason;
use crate::hypercall_log::TraceEntry;
use crate::memory::GuestRam;
use crate::profile::Profiler;
use crate::vcpu::Activity;
use crate::xen::SharedState;

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
/// buffer over guest RAM, writable if mapped so. `BackendOps.grant_unmap`
/// ends it, and refuses while a memoryview of it is still held: a view
/// must never outlive the grant it was taken under (the guest may hand the
/// page to someone else once the grant is released).
#[pyclass(frozen, module = "pvhvm._core")]
pub struct GrantMapping {
    ram: Arc<GuestRam>,
    #[pyo3(get)]
    gref: u32,
    #[pyo3(get)]
    writable: bool,
    gpa: u64,
    len: u64,
    live: AtomicBool,
    /// Buffer exports not yet released (memoryviews, and what slices them).
    views: AtomicUsize,
}

#[pymethods]
impl GrantMapping {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let m = slf.get();
        if !m.live.load(SeqCst) {
            return Err(GrantError::new_err(("unmapped", -5i16)));
        }
        let s = m.ram.slice_mut(m.gpa, m.len).map_err(core_err)?;
        fill_buffer(slf.py(), slf.as_ptr(), view, s.as_mut_ptr(), m.len, !m.writable, flags)?;
        m.views.fetch_add(1, SeqCst);
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.views.fetch_sub(1, SeqCst);
    }

    fn __len__(&self) -> usize {
        self.len as usize
    }

    /// Whether the mapping still stands (not yet unmapped).
    #[getter]
    fn live(&self) -> bool {
        self.live.load(SeqCst)
    }

    /// Memoryviews of the mapping still held.
    #[getter]
    fn views(&self) -> usize {
        self.views.load(SeqCst)
    }
}

/// What a device backend may do to its domain, from any thread: the host
/// end of event channels and the grant table (QEMU's evtchn and gnttab
/// backend ops). Every method takes the port or grant lock itself, so a
/// backend's worker thread may use it while the vCPUs run.
#[pyclass(frozen, module = "pvhvm._core")]
pub struct BackendOps {
    shared: Arc<SharedState>,
}

#[pymethods]
impl BackendOps {
    /// The guest's domain id (grants are checked against domid 0, the host).
    #[getter]
    fn domid(&self) -> u16 {
        self.shared.ports().domid()
    }

    /// A guest port whose far end is the host, for a device the toolstack
    /// sets up before the guest runs (console, xenstore).
    fn bind_host_port(&self) -> PyResult<u32> {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        let mut ev = self.shared.ports();
        let port = ev.alloc(PortState::Unbound { remote: DOMID_HOST }, 0).map_err(|e| core_err(format!("{e:?}")))?;
        ev.set_state(port, PortState::Interdomain { remote: DOMID_HOST, remote_port: port })
            .map_err(|e| core_err(format!("{e:?}")))?;
        Ok(port)
    }

    /// Bind the host end of a port the guest allocated for the host
    /// (EVTCHNOP_alloc_unbound with remote domain 0), as a backend does.
    fn bind_guest_port(&self, port: u32) -> PyResult<()> {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        let mut ev = self.shared.ports();
        match ev.get(port).map(|p| p.state) {
            Some(PortState::Unbound { remote: DOMID_HOST }) => ev
                .set_state(port, PortState::Interdomain { remote: DOMID_HOST, remote_port: port })
                .map_err(|e| core_err(format!("{e:?}"))),
            _ => Err(core_err(format!("port {port} is not waiting for the host"))),
        }
    }

    /// Close the host end of `port`: the guest's end goes back to unbound
    /// (what EVTCHNOP_close in the backend's domain does to its peer).
    /// False if the port was not bound to the host.
    fn unbind_port(&self, port: u32) -> bool {
        use crate::xen::evtchn::{PortState, DOMID_HOST};
        let mut ev = self.shared.ports();
        match ev.get(port).map(|p| p.state) {
            Some(PortState::Interdomain { remote: DOMID_HOST, .. }) => {
                ev.set_state(port, PortState::Unbound { remote: DOMID_HOST }).is_ok()
            }
            _ => false,
        }
    }

    /// Raise the guest's end of a host port and wake the domain. False if
    /// the port is not bound to the host.
    fn notify(&self, port: u32) -> bool {
        self.shared.notify_guest(port)
    }

    /// Copy `length` bytes at `offset` out of the page the guest granted
    /// with `gref` to domain `domid` (0, the host). GrantError if refused.
    #[pyo3(signature = (gref, offset, length, domid = 0))]
    fn grant_read<'py>(&self, py: Python<'py>, gref: u32, offset: u64, length: usize, domid: u16) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; length];
        self.shared.grants().read(&self.shared.ram, gref, domid, offset, &mut buf).map_err(grant_err)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Copy `data` into a granted page at `offset` (the grant must be writable).
    #[pyo3(signature = (gref, offset, data, domid = 0))]
    fn grant_write(&self, gref: u32, offset: u64, data: &[u8], domid: u16) -> PyResult<()> {
        self.shared.grants().write(&self.shared.ram, gref, domid, offset, data).map_err(grant_err)
    }

    /// Map a granted page for a device model; the guest sees it in use
    /// (GTF_reading/GTF_writing) until `grant_unmap`.
    #[pyo3(signature = (gref, writable = false, domid = 0))]
    fn grant_map(&self, gref: u32, writable: bool, domid: u16) -> PyResult<GrantMapping> {
        let ram = self.shared.ram.clone();
        let g = self.shared.grants().map(&ram, gref, domid, writable).map_err(grant_err)?;
        Ok(GrantMapping {
            ram,
            gref,
            writable,
            gpa: g.gpa,
            len: g.len,
            live: AtomicBool::new(true),
            views: AtomicUsize::new(0),
        })
    }

    /// End a mapping. Refused (GrantError "busy") while memoryviews of it
    /// are held: release them first.
    fn grant_unmap(&self, mapping: &GrantMapping) -> PyResult<()> {
        let held = mapping.views.load(SeqCst);
        if held > 0 {
            return Err(GrantError::new_err((
                format!("busy: {held} view(s) of grant {} still held", mapping.gref),
                -1i16,
            )));
        }
        if mapping.live.swap(false, SeqCst) {
            self.shared.grants().unmap(&self.shared.ram, mapping.gref, mapping.writable).map_err(grant_err)
        } else {
            Err(GrantError::new_err(("GNTST_bad_handle", -4i16)))
        }
    }

    /// (version, shared frames placed, status frames placed)
    fn grant_table_info(&self) -> (u32, usize, usize) {
        let g = self.shared.grants();
        (g.version, g.frames.iter().flatten().count(), g.status_frames.iter().flatten().count())
    }
}

/// Why `Vm.run()` returned. `kind` is one of: shutdown, console, notify,
/// kicked, host_io, idle, hung, triple_fault, error, debug; `vcpu` the vCPU
/// it came from (None for the domain as a whole). A `debug` exit's
/// `message` is "breakpoint" or "step" and `address` the vCPU's next
/// instruction (linear).
#[pyclass(frozen, get_all, module = "pvhvm._core")]
pub struct Exit {
    kind: &'static str,
    vcpu: Option<u32>,
    reason: Option<u32>,
    chain: Vec<u8>,
    message: Option<String>,
    address: Option<u64>,
}

#[pymethods]
impl Exit {
    fn __repr__(&self) -> String {
        format!(
            "Exit(kind={:?}, vcpu={:?}, reason={:?}, chain={:?}, message={:?}, address={:?})",
            self.kind, self.vcpu, self.reason, self.chain, self.message, self.address
        )
    }
}

impl From<crate::exit::Exit> for Exit {
    fn from(e: crate::exit::Exit) -> Self {
        let mut x = Exit { kind: "", vcpu: e.vcpu, reason: None, chain: vec![], message: None, address: None };
        match e.reason {
            ExitReason::Shutdown { reason } => {
                x.kind = "shutdown";
                x.reason = Some(reason);
            }
            ExitReason::ConsoleOutput => x.kind = "console",
            ExitReason::Notify => x.kind = "notify",
            ExitReason::Kicked => x.kind = "kicked",
            ExitReason::HostIo => x.kind = "host_io",
            ExitReason::Idle => x.kind = "idle",
            ExitReason::Hung { why } => {
                x.kind = "hung";
                x.message = Some(why);
            }
            ExitReason::TripleFault { chain } => {
                x.kind = "triple_fault";
                x.chain = chain;
            }
            ExitReason::Error { message } => {
                x.kind = "error";
                x.message = Some(message);
            }
            ExitReason::Debug { stop, address } => {
                x.kind = "debug";
                x.message = Some(stop.name().to_string());
                x.address = Some(address);
            }
        }
        x
    }
}

type TraceTuple = (u32, u64, (u64, u64, u64, u64, u64), i64, u64);

type ProfileSample = (u64, u32, u8, u32, u8, u8, u64, Vec<u64>);

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

fn activity_name(a: &Activity) -> &'static str {
    match a {
        Activity::Running => "running",
        Activity::Halted => "halted",
        Activity::Blocked => "blocked",
        Activity::Polling { .. } => "polling",
        Activity::WaitForSipi => "wait_for_sipi",
    }
}

/// One domain: RAM, the vCPUs and Xen's state. Built and driven by `pvhvm.Domain`.
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
    #[pyo3(signature = (memory_bytes, domid = 1, uuid = None, vcpus = 1))]
    fn new(memory_bytes: u64, domid: u32, uuid: Option<&[u8]>, vcpus: u32) -> PyResult<Self> {
        let mut u = [0u8; 16];
        if let Some(b) = uuid {
            if b.len() != 16 {
                return Err(PyValueError::new_err("uuid must be 16 bytes"));
            }
            u.copy_from_slice(b);
        }
        Ok(Self { domain: Domain::new(memory_bytes, domid, u, vcpus).map_err(core_err)? })
    }

    #[getter]
    fn memory(&self) -> GuestMemory {
        GuestMemory { ram: self.domain.ram().clone() }
    }

    /// RAM pages the domain holds now (Xen's tot_pages): its RAM less the
    /// pages it gave back (XENMEM_decrease_reservation, the balloon).
    #[getter]
    fn populated_pages(&self) -> u64 {
        self.domain.state.populated_pages()
    }

    /// The most RAM pages the domain may hold (Xen's max_pages).
    #[getter]
    fn get_max_pages(&self) -> u64 {
        self.domain.state.max_pages
    }

    #[setter]
    fn set_max_pages(&mut self, pages: u64) {
        self.domain.state.max_pages = pages;
    }

    /// [(guest-physical start, length, host offset)] of every RAM region.
    fn ram_regions(&self) -> Vec<(u64, u64, u64)> {
        self.domain.ram().regions().iter().map(|r| (r.gpa, r.len, r.host_offset)).collect()
    }

    /// Copy `data` (bytes or any contiguous buffer, e.g. a memoryview of a
    /// mapped file: no intermediate copy) into guest RAM at `gpa`.
    fn write_phys(&self, py: Python<'_>, gpa: u64, data: pyo3::buffer::PyBuffer<u8>) -> PyResult<()> {
        let s = self.domain.ram().slice_mut(gpa, data.item_count() as u64).map_err(core_err)?;
        data.copy_to_slice(py, s)
    }

    fn read_phys<'py>(&self, py: Python<'py>, gpa: u64, length: u64) -> PyResult<Bound<'py, PyBytes>> {
        let s = self.domain.ram().slice(gpa, length).map_err(core_err)?;
        Ok(PyBytes::new(py, s))
    }

    /// Read guest-linear memory through vCPU `vcpu`'s page tables.
    #[pyo3(signature = (va, length, vcpu = 0))]
    fn read_linear<'py>(&self, py: Python<'py>, va: u64, length: usize, vcpu: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; length];
        self.domain.read_linear(vcpu, va, &mut buf).map_err(core_err)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Write guest-linear memory through vCPU `vcpu`'s page tables, as a
    /// debugger does (read-only pages too). CoreError on an unmapped page,
    /// before any byte is written.
    #[pyo3(signature = (va, data, vcpu = 0))]
    fn write_linear(&mut self, va: u64, data: &[u8], vcpu: usize) -> PyResult<()> {
        self.domain.write_linear(vcpu, va, data).map_err(core_err)
    }

    /// Set a register of vCPU `vcpu` (between runs): a general register
    /// by the name `registers()` gives it, rip or rflags.
    fn set_register(&mut self, vcpu: usize, name: &str, value: u64) -> PyResult<()> {
        self.domain.set_register(vcpu, name, value).map_err(PyValueError::new_err)
    }

    /// The debugger's code breakpoints (linear addresses), replacing the
    /// earlier set: a vCPU reaching one stops before executing it, and
    /// `run()` returns a `debug` exit. No guest memory changes.
    fn set_breakpoints(&mut self, addresses: Vec<u64>) -> PyResult<()> {
        self.domain.debug.set_breakpoints(&addresses).map_err(PyValueError::new_err)
    }

    #[getter]
    fn breakpoints(&self) -> Vec<u64> {
        self.domain.debug.breakpoints.iter().copied().collect()
    }

    /// Ask vCPU `vcpu` to execute one instruction (no interrupt is
    /// delivered to it meanwhile) and stop: the next `run()` that runs it
    /// returns a `debug` exit ("step"). A halted, blocked or down vCPU
    /// stops at once. `on=False` takes the request back.
    #[pyo3(signature = (vcpu, on = true))]
    fn single_step(&mut self, vcpu: usize, on: bool) -> PyResult<()> {
        if vcpu >= self.domain.vcpus.len() {
            return Err(PyValueError::new_err("no such vCPU"));
        }
        self.domain.debug.request_step(vcpu, on);
        Ok(())
    }

    /// vCPUs the scheduler leaves alone until the next call (a debugger
    /// stepping one vCPU while the others stay stopped); [] for none.
    fn set_frozen_vcpus(&mut self, vcpus: Vec<usize>) {
        self.domain.debug.set_frozen(&vcpus);
    }

    fn set_pvh_entry(&mut self, entry: u64, start_info: u64) -> PyResult<()> {
        self.domain.set_pvh_entry(entry, start_info).map_err(core_err)
    }

    /// The core's part of a save (vCPUs, event channels, grant table, HVM
    /// params, timers, Xen's pages outside RAM): an opaque, versioned record.
    fn save_state<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.domain.save_state())
    }

    /// Write guest RAM to file `fd` at page-aligned `offset` (the file
    /// already that long: pages of zeros are left as holes). Returns the
    /// page runs written, [(first page, pages)], and their CRC-32.
    fn write_ram_image(&self, py: Python<'_>, fd: i32, offset: u64) -> PyResult<(Vec<(u64, u64)>, u32)> {
        let ram = self.domain.ram().clone();
        py.allow_threads(move || ram.write_image(fd, offset)).map_err(core_err)
    }

    /// Put guest RAM on the image `write_ram_image` wrote to `fd` at
    /// `offset`, in place and copy-on-write (a fork's parent shares its
    /// pages with its children from then on). Between runs only.
    fn rebase_ram(&self, fd: i32, offset: u64) -> PyResult<()> {
        self.domain.ram().rebase_on_file(fd, offset).map_err(core_err)
    }

    /// A domain from a save: RAM mapped copy-on-write from `fd` at
    /// `offset` (`memory_bytes` long), checked against `runs` and `crc` if
    /// given, and `state` from `save_state`. `domid` and `uuid` may differ
    /// from the saved domain's (a fork).
    #[staticmethod]
    #[pyo3(signature = (fd, offset, memory_bytes, domid, uuid, state, runs = None, crc = None))]
    #[allow(clippy::too_many_arguments)]
    fn restore(
        py: Python<'_>,
        fd: i32,
        offset: u64,
        memory_bytes: u64,
        domid: u32,
        uuid: &[u8],
        state: &[u8],
        runs: Option<Vec<(u64, u64)>>,
        crc: Option<u32>,
    ) -> PyResult<Self> {
        let u: [u8; 16] = uuid.try_into().map_err(|_| PyValueError::new_err("uuid must be 16 bytes"))?;
        let ram = GuestRam::from_file(fd, offset, memory_bytes).map_err(core_err)?;
        if let (Some(runs), Some(crc)) = (runs, crc) {
            let found = py.allow_threads(|| ram.crc_of(&runs));
            match found {
                None => return Err(core_err("the RAM image's page runs lie outside its RAM")),
                Some(c) if c != crc => {
                    return Err(core_err(format!("the RAM image is damaged (CRC-32 {c:08x}, expected {crc:08x})")))
                }
                Some(_) => {}
            }
        }
        Ok(Self { domain: Domain::restore(ram, domid, u, state).map_err(core_err)? })
    }

    /// Run the guest until the host is needed. Releases the GIL meanwhile.
    fn run(&mut self, py: Python<'_>) -> Exit {
        let p = DomainPtr(&mut self.domain);
        let exit = py.allow_threads(move || unsafe { (*p.get()).run() });
        exit.into()
    }

    /// Sleep, without the GIL, until another thread raises an event for
    /// the guest or wakes the domain ("signalled"), the host fd is ready
    /// ("host_io"), or `timeout` seconds pass ("timeout"). The run loop's
    /// wait when `run()` returned `idle`: a backend's worker thread that
    /// answers a request ends it, which Python's selector would not see.
    #[pyo3(signature = (timeout = None))]
    fn wait_for_events(&self, py: Python<'_>, timeout: Option<f64>) -> &'static str {
        use crate::waker::Wait;
        let shared = self.domain.shared().clone();
        let host_fd = self.domain.host_fd;
        // Any float: NaN and negatives wait not at all, the far future a day.
        let timeout = timeout.map(|t| {
            std::time::Duration::try_from_secs_f64(t.clamp(0.0, 86_400.0)).unwrap_or(std::time::Duration::ZERO)
        });
        match py.allow_threads(move || shared.waker.wait(host_fd, timeout)) {
            Wait::Signalled => "signalled",
            Wait::HostReady => "host_io",
            Wait::TimedOut => "timeout",
        }
    }

    /// A descriptor (Python's event loop) whose readiness ends the
    /// domain's idle wait with a `host_io` exit; None to forget it.
    #[pyo3(signature = (fd = None))]
    fn set_host_fd(&mut self, fd: Option<i32>) {
        self.domain.host_fd = fd;
    }

    #[getter]
    fn vcpus(&self) -> usize {
        self.domain.vcpus.len()
    }

    /// vCPU `vcpu`'s scheduling state: online, activity, runstate,
    /// exceptions and interrupts delivered.
    fn vcpu_status<'py>(&self, py: Python<'py>, vcpu: usize) -> PyResult<Bound<'py, PyDict>> {
        let v = self.domain.vcpus.get(vcpu).ok_or_else(|| PyValueError::new_err("no such vCPU"))?;
        let d = PyDict::new(py);
        d.set_item("online", !v.down)?;
        d.set_item("activity", activity_name(&v.activity))?;
        d.set_item("runstate", ["running", "runnable", "blocked", "offline"][v.runstate.state as usize])?;
        d.set_item("runstate_ns", v.runstate.times(self.domain.state.system_time_ns()).to_vec())?;
        d.set_item("exceptions", v.exceptions_delivered)?;
        d.set_item("interrupts", v.interrupts_delivered)?;
        Ok(d)
    }

    fn take_console_output<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let out = std::mem::take(&mut self.domain.state.console_out);
        PyBytes::new(py, &out)
    }

    fn push_console_input(&mut self, data: &[u8]) {
        self.domain.state.console_in.extend(data.iter().copied());
    }

    #[getter]
    fn get_tracing(&self) -> bool {
        self.domain.state.log.tracing
    }

    #[setter]
    fn set_tracing(&mut self, on: bool) {
        self.domain.state.log.tracing = on;
    }

    /// Drain the hypercall trace: [(vcpu, nr, (a0..a4), result, time_ns)].
    fn take_trace(&mut self) -> Vec<TraceTuple> {
        self.domain.state.log.take_trace().iter().map(trace_tuple).collect()
    }

    /// The last hypercalls of every vCPU (kept even with tracing off), oldest first.
    fn recent_hypercalls(&self) -> Vec<TraceTuple> {
        self.domain.state.log.recent().iter().map(trace_tuple).collect()
    }

    /// {hypercall number: calls so far}
    fn hypercall_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (nr, &n) in self.domain.state.log.counts.iter().enumerate() {
            if n > 0 {
                d.set_item(nr, n)?;
            }
        }
        Ok(d)
    }

    #[pyo3(signature = (vcpu = 0))]
    fn registers<'py>(&self, py: Python<'py>, vcpu: usize) -> PyResult<Bound<'py, PyDict>> {
        let regs = self.domain.registers(vcpu).ok_or_else(|| PyValueError::new_err("no such vCPU"))?;
        let d = PyDict::new(py);
        for (k, val) in regs {
            d.set_item(k, val)?;
        }
        Ok(d)
    }

    /// Start sampling where the domain's time goes, `hz` times a second
    /// (profile.rs); a profile already running starts again.
    fn start_profile(&mut self, hz: u32) -> PyResult<()> {
        self.domain.profiler = Some(Profiler::new(hz).map_err(PyValueError::new_err)?);
        Ok(())
    }

    /// Stop sampling; returns the samples not taken yet and the ticks
    /// dropped past the cap (see `take_profile`).
    fn stop_profile(&mut self) -> (Vec<ProfileSample>, u64) {
        let r = self.take_profile();
        self.domain.profiler = None;
        r
    }

    /// The samples since the last call, and the ticks dropped so far:
    /// [(t_ns, weight, place, vcpu, cpl, bits, ip, [return addresses])],
    /// place 0 = guest, 1 = idle, 2 = host; t_ns on CLOCK_MONOTONIC.
    fn take_profile(&mut self) -> (Vec<ProfileSample>, u64) {
        let Some(p) = self.domain.profiler.as_mut() else { return (Vec::new(), 0) };
        let samples = p.take().into_iter().map(|s| (s.t_ns, s.weight, s.place as u8, s.vcpu, s.cpl, s.bits, s.ip, s.frames));
        (samples.collect(), p.dropped)
    }

    /// The first guest instruction, hypercall and user-space instruction,
    /// as CLOCK_MONOTONIC ns (None: not yet).
    #[getter]
    fn milestones<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.domain.state.milestones;
        let d = PyDict::new(py);
        d.set_item("first_instruction", m.first_instruction)?;
        d.set_item("first_hypercall", m.first_hypercall)?;
        d.set_item("first_user_instruction", m.first_user_instruction)?;
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
        self.domain.code_cache_flushes()
    }

    /// RDMSR sites with a code hook, and reads answered there (MSRs such
    /// as ARCH_CAPABILITIES that Unicorn would read as 0).
    #[getter]
    fn rdmsr_stats(&self) -> (usize, u64) {
        self.domain.rdmsr_stats()
    }

    /// Times the engine switched from one vCPU's registers to another's.
    #[getter]
    fn context_switches(&self) -> u64 {
        self.domain.context_switches()
    }

    /// Times the domain slept in the core with every vCPU idle.
    #[getter]
    fn idle_waits(&self) -> u64 {
        self.domain.idle_waits
    }

    #[getter]
    fn shutdown_code(&self) -> Option<u32> {
        self.domain.state.shutdown_code
    }

    fn system_time_ns(&self) -> u64 {
        self.domain.state.system_time_ns()
    }

    /// The E820 map XENMEM_memory_map hands out: [(addr, size, type)].
    fn set_memory_map(&mut self, entries: Vec<(u64, u64, u32)>) {
        self.domain.state.memory_map = entries;
    }

    /// Set an HVM parameter, as the toolstack does (STORE_PFN, CONSOLE_EVTCHN …).
    fn set_hvm_param(&mut self, index: usize, value: u64) -> PyResult<()> {
        let slot =
            self.domain.state.hvm_params.get_mut(index).ok_or_else(|| PyValueError::new_err("no such HVM param"))?;
        *slot = value;
        Ok(())
    }

    fn get_hvm_param(&self, index: usize) -> PyResult<u64> {
        self.domain.state.hvm_params.get(index).copied().ok_or_else(|| PyValueError::new_err("no such HVM param"))
    }

    /// Ports the guest notified since the last call.
    fn take_notifications(&mut self) -> Vec<u32> {
        self.domain.shared().ports().take_host_notifications()
    }

    /// The device backends' handle on this domain (thread-safe).
    fn backend_ops(&self) -> BackendOps {
        BackendOps { shared: self.domain.shared().clone() }
    }

    /// A thread-safe handle that makes a running `run()` return soon
    /// (`kicked`) and ends its idle wait.
    fn waker(&self) -> Waker {
        Waker { shared: self.domain.shared().clone() }
    }

    /// `run()` returns `kicked` at least this often (ms).
    #[setter]
    fn set_time_slice_ms(&mut self, ms: u64) {
        self.domain.time_slice = std::time::Duration::from_millis(ms.max(1));
    }

    #[getter]
    fn interrupts_delivered(&self) -> u64 {
        self.domain.vcpus.iter().map(|v| v.interrupts_delivered).sum()
    }
}

/// Brings a running `Vm.run()` back to its caller, from any thread.
#[pyclass(frozen, module = "pvhvm._core")]
pub struct Waker {
    shared: Arc<SharedState>,
}

#[pymethods]
impl Waker {
    fn wake(&self) {
        self.shared.waker.wake_host();
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
    d.set_item("xcr0", l.xcr0)?;
    d.set_item("tsc_offset", l.tsc_offset)?;
    Ok(d)
}

/// A full memory barrier (MFENCE). A backend serving a ring from another
/// thread while the vCPUs run needs one where io/ring.h has `xen_mb()`:
/// between writing an event index and reading the other side's producer
/// index (x86 may reorder that store after the load), or a notification
/// is lost and both sides wait for ever.
#[pyfunction]
fn memory_barrier() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
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
    m.add_class::<Waker>()?;
    m.add("MAX_VCPUS", crate::domain::MAX_VCPUS)?;
    m.add_class::<GrantMapping>()?;
    m.add_class::<BackendOps>()?;
    m.add("GrantError", m.py().get_type::<GrantError>())?;
    m.add_function(wrap_pyfunction!(self_test, m)?)?;
    m.add_function(wrap_pyfunction!(host_tsc, m)?)?;
    m.add_function(wrap_pyfunction!(memory_barrier, m)?)?;
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
