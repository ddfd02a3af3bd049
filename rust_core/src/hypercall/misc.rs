//! Small hypercalls: vm_assist.

use super::{Call, HcResult};
use crate::abi::errno;

const VMASST_CMD_ENABLE: u64 = 0;
const VMASST_CMD_DISABLE: u64 = 1;
/// VMASST_TYPE_runstate_update_flag: the only assist an HVM guest may ask for.
const VMASST_TYPE_RUNSTATE_UPDATE_FLAG: u64 = 5;

pub fn vm_assist(c: &mut Call, args: [u64; 5]) -> HcResult {
    let [cmd, kind, ..] = args;
    if kind != VMASST_TYPE_RUNSTATE_UPDATE_FLAG {
        return Err(errno::EINVAL);
    }
    match cmd {
        VMASST_CMD_ENABLE => c.dom.vm_assist |= 1 << kind,
        VMASST_CMD_DISABLE => c.dom.vm_assist &= !(1 << kind),
        _ => return Err(errno::ENOSYS),
    }
    Ok(0)
}
