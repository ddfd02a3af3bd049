"""pvhvm's exceptions. Everything a user can cause derives from PvhvmError and
carries a one-line message; the CLI prints it and exits with status 2."""


class PvhvmError(Exception):
    """Base of all pvhvm errors."""


class BuildError(PvhvmError):
    """The domain cannot be built: bad kernel image, initrd, memory size …"""


class GuestError(PvhvmError):
    """The guest did something the hypervisor cannot carry on from."""
