//! End-to-end: the QMP client and `info mtree -f` parser against a real QEMU guest.

mod common;

use std::time::{Duration, Instant};

use common::*;
use profiler::identity::{
    cmdline::QmpEndpoint,
    qmp::{self, DEFAULT_TIMEOUT},
};
use xtask::launch::DeviceSet;

/// Device names behind ports from a booted Noisy guest (parallel, serial, UHCI), and QEMU's
/// one-client-per-monitor rule seen as a "busy" error within the deadline.
#[test]
fn device_names_and_busy_monitor() {
    let Some(image) = e2e_guest_image("qmp_device_names") else {
        return;
    };
    let dir = run_dir("qmp");
    let guest = boot("e2e-qmp", DeviceSet::Noisy, &image, dir.path());
    let endpoint = QmpEndpoint::Unix(guest.qmp_socket().to_str().unwrap().to_string());

    let started = Instant::now();
    let map = qmp::device_names(&endpoint, DEFAULT_TIMEOUT).expect("info mtree -f over QMP");
    eprintln!(
        "device_names took {:?}: {} I/O ranges, {} memory ranges",
        started.elapsed(),
        map.io.len(),
        map.memory.len()
    );
    assert_eq!(map.name_for_port(0x378), Some("parallel"), "{map:#?}");
    assert_eq!(map.name_for_port(0x37a), Some("parallel"));
    assert_eq!(map.name_for_port(0x3f8), Some("serial"));
    assert_eq!(map.name_for_port(0x3fd), Some("serial"));
    assert_eq!(map.name_for_gpa(0xfed0_0000), Some("hpet"));

    // The UHCI controller's I/O BAR, as the guest's firmware assigned it, from `query-pci`.
    let mut client = qmp::connect(&endpoint, DEFAULT_TIMEOUT).expect("connect");
    assert!(client.qemu_version().is_some(), "{:?}", client.greeting());
    let pci = client.execute("query-pci", None).expect("query-pci");
    let (bar, size) = uhci_io_bar(&pci).unwrap_or_else(|| panic!("no UHCI I/O BAR in {pci:#}"));
    eprintln!("UHCI I/O BAR: {bar:#x}, {size} bytes");
    assert_eq!(map.name_for_port(bar), Some("uhci"), "{map:#?}");
    assert_eq!(map.name_for_port(bar + size - 1), Some("uhci"));
    let range = map.io.iter().find(|r| r.name == "uhci").unwrap();
    assert_eq!((range.start, range.end), (bar, bar + size - 1));

    // While `client` holds the monitor, a second client gets no greeting: busy, in time.
    let started = Instant::now();
    let err = qmp::connect(&endpoint, Duration::from_secs(2))
        .err()
        .expect("a second QMP client must not get in");
    let took = started.elapsed();
    let msg = format!("{err:#}");
    eprintln!("second client after {took:?}: {msg}");
    assert!(msg.contains("is busy"), "{msg}");
    // Given up at its 2 s deadline, not left hanging (a slow host may add to it).
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The first client still works, and once it leaves the monitor is free again.
    assert!(
        client
            .hmp("info mtree -f")
            .unwrap()
            .contains("(prio 0, i/o): parallel")
    );
    drop(client);
    let deadline = Instant::now() + HANG;
    loop {
        match qmp::connect(&endpoint, DEFAULT_TIMEOUT) {
            Ok(mut c) => {
                c.execute("query-status", None).expect("query-status");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("monitor not free yet: {e:#}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("monitor still busy after the first client left: {e:#}"),
        }
    }
    // Write commands are refused before they reach QEMU: the guest keeps running.
    let mut c = qmp::connect(&endpoint, DEFAULT_TIMEOUT).expect("connect");
    assert!(c.execute("stop", None).is_err());
    let status = c.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    assert!(guest.try_wait().unwrap().is_none(), "QEMU still runs");
}

/// (address, size) of the I/O BAR of the UHCI controller (PCI class 0x0c03, prog-if 0).
fn uhci_io_bar(pci: &serde_json::Value) -> Option<(u64, u64)> {
    pci.as_array()?
        .iter()
        .flat_map(|bus| bus["devices"].as_array().into_iter().flatten())
        .filter(|dev| dev["class_info"]["class"].as_u64() == Some(0x0c03))
        .flat_map(|dev| dev["regions"].as_array().into_iter().flatten())
        .find(|r| r["type"] == "io")
        .and_then(|r| Some((r["address"].as_u64()?, r["size"].as_u64()?)))
}
