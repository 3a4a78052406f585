fn main() {
    // Tell rustc about the `bpf_target_arch` cfg that aya-ebpf's helpers are gated on.
    if let Err(e) = aya_build::emit_bpf_target_arch_cfg() {
        panic!("{e}");
    }
}
