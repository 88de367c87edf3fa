//! The kernel side, seen from user space: loading and attaching the programs (`attach`),
//! draining their maps without loss and driving their control word (`drain`), and reading
//! the trace ring buffer (`ring`), what the maps cost in memory (`memory`), and the running kernel's BTF for the drop programs (`btf`), and whether a seccomp filter
//! is what refused a bpf() call (`seccomp`). Map and program names come from `flowtrace-common`.

pub mod attach;
pub mod btf;
pub mod drain;
pub mod memory;
pub mod ring;
pub mod seccomp;
