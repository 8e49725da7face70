use which::which;

/// The eBPF crate has an undeclared dependency on the `bpf-linker` binary: rebuild when it
/// changes (the aya-template approach).
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found on PATH: run `cargo xtask setup` (it installs bpf-linker)");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
