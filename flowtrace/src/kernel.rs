//! The kernel side, seen from user space: loading and attaching the programs (`attach`),
//! draining their maps without loss and driving their control word (`drain`), and reading
//! the trace ring buffer (`ring`). Map and program names come from `flowtrace-common`.

pub mod attach;
pub mod drain;
pub mod ring;
