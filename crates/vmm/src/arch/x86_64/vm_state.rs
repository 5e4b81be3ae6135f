//! Saving and restoring the VM-wide KVM state: PIT, kvmclock, and the three irqchips.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    fd.get_irqchip(&mut chip).map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

pub fn save(fd: &VmFd) -> Result<VmState> {
    let pit = fd.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?;
    let mut clock = fd.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
    // Only the clock value travels; the flags describe this host's clock source.
    clock.flags = 0;
    Ok(VmState {
        pit,
        clock,
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
    })
}

pub fn restore(fd: &VmFd, s: &VmState) -> Result<()> {
    fd.set_pit2(&s.pit).map_err(Error::kvm("KVM_SET_PIT2"))?;
    fd.set_clock(&s.clock).map_err(Error::kvm("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(chip).map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
