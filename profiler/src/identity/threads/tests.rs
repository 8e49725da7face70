use super::*;

// Read on this machine from a Debian QEMU running a boot sector under KVM (PVM),
// `-name pit1000,debug-threads=on`.
const MAIN: &str = "10101 (qemu-system-x86) S 1 10099 10099 0 -1 138412480 2609 0 0 0 0 1 0 0 20 0 4 0 656969 316096512 6224 18446744073709551615 94368685346816 94368691207253 140736362645088 0 0 0 268444224 3674112 16963 1 0 0 17 1 0 0 0 0 0 94368694319352 94368699523504 94369197527040 140736362650116 140736362650321 140736362650321 140736362651612 0\n";
const VCPU: &str = "10103 (CPU 0/KVM) R 1 10099 10099 0 -1 138412224 300 0 0 0 3 3069 0 0 20 0 4 0 656970 316096512 6224 18446744073709551615 94368685346816 94368691207253 140736362645088 0 0 0 2147219511 3674112 16963 0 0 0 -1 1 0 0 0 4 0 94368694319352 94368699523504 94369197527040 140736362650116 140736362650321 140736362650321 140736362651612 0\n";
const NX: &str = "10106 (kvm-nx-lpage-re) S 1 10099 10099 0 -1 138428608 0 0 0 0 0 0 0 0 20 0 4 0 656972 316096512 6224 18446744073709551615 94368685346816 94368691207253 140736362645088 0 0 0 2147221247 3674112 16963 1 0 0 -1 1 0 0 0 0 0 94368694319352 94368699523504 94369197527040 140736362650116 140736362650321 140736362650321 140736362651612 0\n";
const PIT: &str = "10104 (kvm-pit/10101) S 2 0 0 0 -1 2129984 0 0 0 0 0 140 0 0 20 0 1 0 656971 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

#[test]
fn stat_fields_are_counted_after_a_name_with_spaces() {
    let s = parse_thread_stat(VCPU).unwrap();
    assert_eq!(s.comm, "CPU 0/KVM");
    assert_eq!(s.ticks, 3 + 3069);
    assert_eq!(s.guest_ticks, 4);
    assert_eq!(parse_thread_stat(PIT).unwrap().ticks, 140);
    assert_eq!(parse_thread_stat("garbage"), None);
    assert_eq!(parse_thread_stat("1 (x) S 1"), None);
}

#[test]
fn roles_from_names_and_flags() {
    let role = |stat: &str, tid, pid| role_by_name(&parse_thread_stat(stat).unwrap(), tid, pid);
    assert_eq!(role(MAIN, 10101, 10101), Some(ThreadRole::DeviceModel));
    assert_eq!(role(VCPU, 10103, 10101), Some(ThreadRole::Vcpu));
    // The NX recovery worker's syscall file shows KVM_RUN too (copied from its creator): its
    // flags, not what it seems to do, decide.
    assert_eq!(role(NX, 10106, 10101), Some(ThreadRole::KernelWorker));
    let named = |comm: &str, tid| {
        role_by_name(
            &ThreadStat {
                comm: comm.into(),
                flags: 0,
                ticks: 0,
                guest_ticks: 0,
            },
            tid,
            1,
        )
    };
    assert_eq!(named("IO iothread0", 5), Some(ThreadRole::DeviceModel));
    assert_eq!(named("CPU 3/TCG", 5), Some(ThreadRole::Vcpu));
    assert_eq!(named("call_rcu", 5), Some(ThreadRole::Other));
    assert_eq!(named("worker", 5), Some(ThreadRole::Other));
    // Without debug-threads every thread is named after the executable.
    assert_eq!(named("qemu-system-x86", 5), None);
    assert_eq!(named("qemu-system-x86", 1), Some(ThreadRole::DeviceModel));
}

#[test]
fn kvm_run_is_seen_in_the_syscall_file() {
    assert!(in_kvm_run(
        "16 0xe 0xae80 0x0 0xa3d70a3d70a3d70b 0x55d3ec613290 0x0 0x7fce6a9fe530 0x7fce6d1cbd6b\n"
    ));
    assert!(!in_kvm_run("16 0xe 0xae81 0x0 0x0 0x0 0x0 0x0 0x0"));
    assert!(!in_kvm_run(
        "271 0x55d40afd5080 0x4 0x7fffbce70420 0x0 0x8 0x0 0x7fffbce70400 0x7fce6d1ca366"
    ));
    assert!(!in_kvm_run("running\n"));
    assert!(!in_kvm_run(""));
}

#[test]
fn kernel_workers_are_found_by_the_pid_in_their_name() {
    assert_eq!(kernel_worker_owner("kvm-pit/10101"), Some(10101));
    assert_eq!(kernel_worker_owner("vhost-4242"), Some(4242));
    assert_eq!(kernel_worker_owner("kworker/0:1-events"), None);
    assert_eq!(kernel_worker_owner("kvm-pit/x"), None);
}

/// A fake procfs: one QEMU with a named vCPU, an unnamed thread blocked in KVM_RUN, and one
/// that is not; a kernel thread serving it and one serving nothing.
#[test]
fn a_process_tree_is_read_with_sticky_roles() {
    let root = tempfile::tempdir().unwrap();
    let p = root.path();
    let write = |path: &str, text: &str| {
        let path = p.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("10101/task/10101/stat", MAIN);
    write("10101/task/10103/stat", VCPU);
    let unnamed = |tid: u32| MAIN.replacen("10101", &tid.to_string(), 1);
    write("10101/task/10200/stat", &unnamed(10200));
    write(
        "10101/task/10200/syscall",
        "16 0xf 0xae80 0x0 0x0 0x0 0x0 0x0 0x0\n",
    );
    write("10101/task/10201/stat", &unnamed(10201));
    write("10101/task/10201/syscall", "running\n");
    write("2/task/2/children", "10104 77 ");
    write("10104/stat", PIT);
    write("77/stat", &PIT.replace("kvm-pit/10101", "kworker/1:0"));

    let mut threads = read_threads(p, 10101, &HashMap::new()).unwrap();
    threads.sort_by_key(|t| t.tid);
    let roles: Vec<_> = threads.iter().map(|t| (t.tid, t.role, t.settled)).collect();
    assert_eq!(
        roles,
        vec![
            (10101, ThreadRole::DeviceModel, true),
            (10103, ThreadRole::Vcpu, true),
            (10200, ThreadRole::Vcpu, true),
            (10201, ThreadRole::Other, false),
        ]
    );
    // A settled role is not asked again, even when the thread now looks otherwise.
    write("10101/task/10200/syscall", "running\n");
    let settled = HashMap::from([(10200, ThreadRole::Vcpu)]);
    let again = read_threads(p, 10101, &settled).unwrap();
    assert!(
        again
            .iter()
            .any(|t| t.tid == 10200 && t.role == ThreadRole::Vcpu)
    );
    assert_eq!(read_threads(p, 999, &HashMap::new()), None);

    let mut workers = KernelWorkers::default();
    let found = workers.read(p);
    assert_eq!(
        found,
        vec![KernelWorkerSample {
            owner: 10101,
            tid: 10104,
            ticks: 140
        }]
    );
    // Read again: the unrelated thread is not looked at twice; a gone one is forgotten.
    std::fs::remove_file(p.join("77/stat")).unwrap();
    assert_eq!(workers.read(p), found);
    write("2/task/2/children", "77");
    assert!(workers.read(p).is_empty());
}
