//! Tiny real-mode payloads on the host's own /dev/kvm. These run even on PVM hosts,
//! which cannot boot a real guest kernel: they check the VMM's KVM plumbing (memory
//! registration, port I/O and MMIO dispatch, the in-kernel irqchip, the i8042 reset
//! line and the virtio-mmio register block) without a kernel.

use std::io::Write;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use vm_memory::{Bytes, GuestAddress};
use wisp_tests::harness::{need_kvm, CaseResult, Outcome, Suite};
use wisp_tests::{ensure_that, skip_unless};
use wisp_vmm::arch::layout;
use wisp_vmm::devices::bus::{Bus, BusDevice};
use wisp_vmm::devices::legacy::{SerialConsole, I8042};
use wisp_vmm::devices::virtio::mmio::MmioTransport;
use wisp_vmm::devices::virtio::rng::Rng;
use wisp_vmm::vstate::vcpu::{Vcpu, VcpuSet};
use wisp_vmm::vstate::vm::Vm;
use wisp_vmm::VmExit;

fn real_mode(vcpu: &kvm_ioctls::VcpuFd, entry: u64) -> anyhow::Result<()> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_bindings::kvm_regs { rip: entry, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs)?;
    Ok(())
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Through wisp-vmm's own VM, buses and devices: read the virtio-mmio magic of an
/// rng device, print it on the serial console, then reboot through the i8042.
fn mmio_serial_and_reset_through_the_vmm() -> CaseResult {
    skip_unless!(need_kvm());
    // 64 KiB of RAM; the virtio-mmio block sits right after it at 0x10000.
    let vm = Vm::new(0x10000).context("creating the VM")?;
    let mmio_base = 0x10000u64;
    let code: &[u8] = &[
        0xb8, 0x00, 0x10, // mov ax, 0x1000
        0x8e, 0xd8, // mov ds, ax
        0x66, 0xa1, 0x00, 0x00, // mov eax, [0]   (32-bit read of MagicValue)
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0x66, 0xc1, 0xe8, 0x08, 0xee, // shr eax, 8; out dx, al
        0x66, 0xc1, 0xe8, 0x08, 0xee, 0x66, 0xc1, 0xe8, 0x08, 0xee, 0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al   (i8042 reset)
        0xf4, 0xeb, 0xfd, // hlt; jmp back
    ];
    vm.mem.write_slice(code, GuestAddress(0x1000))?;

    let (exits_tx, exits_rx) = channel();
    let console = Capture::default();
    let mut pio = Bus::new();
    let irq = vmm_sys_util::eventfd::EventFd::new(0)?;
    vm.fd.register_irqfd(&irq, layout::SERIAL_IRQ)?;
    let uart = Arc::new(Mutex::new(SerialConsole::new(irq, Box::new(console.clone()), None)));
    let serial: Arc<Mutex<dyn BusDevice>> = uart.clone();
    pio.insert(serial, u64::from(layout::SERIAL_PORT), 8)?;
    let tx = Mutex::new(exits_tx.clone());
    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(Box::new(move || {
        let _ = tx.lock().unwrap().send(VmExit::GuestReset);
    }))));
    pio.insert(i8042, u64::from(layout::I8042_PORT), layout::I8042_PORT_LEN)?;

    let mut mmio = Bus::new();
    let rng = Arc::new(Mutex::new(Rng::new()?));
    let transport = MmioTransport::new(vm.mem.clone(), rng)?;
    mmio.insert(Arc::new(Mutex::new(transport)), mmio_base, layout::VIRTIO_MMIO_SIZE)?;

    let vcpu = Vcpu::new(&vm.fd, 0)?;
    real_mode(vcpu.fd(), 0x1000)?;
    let _vcpus = VcpuSet::start(vec![vcpu], Arc::new(pio), Arc::new(mmio), exits_tx)?;
    let exit = exits_rx.recv_timeout(Duration::from_secs(20)).context("the payload never reset the VM")?;
    ensure_that!(exit == VmExit::GuestReset, "VM ended with {exit:?}, want GuestReset");
    // The console writes whole lines; "virt" has no newline: the VM's end writes it.
    uart.lock().unwrap().flush_output();
    let out = console.0.lock().unwrap().clone();
    ensure_that!(
        out == b"virt",
        "console printed {:?}, want the virtio-mmio magic \"virt\"",
        String::from_utf8_lossy(&out)
    );
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("kvm_payload").case("mmio_serial_and_reset_through_the_vmm", mmio_serial_and_reset_through_the_vmm).run()
}
