//! The benchmark's reference programs (`flowtrace-ebpf-baselines`, built by `build.rs`):
//! `bench_noop`, the floor of a TC program run, and `bench_counter`, a plain IPv4 5-tuple
//! counter in `BASELINE_FLOWS`; `bench_kfree_noop` and `bench_kfree_count`, the same for a
//! raw tracepoint on `kfree_skb` (nothing; a count per drop reason in `BASELINE_DROPS`). `cargo xtask bench`/`microbench` measure flowtrace against
//! them; an integration test attaches one as a neighbour of flowtrace's programs.

/// The object built from `flowtrace-ebpf-baselines`.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowtrace-baselines"));

/// The program that does nothing (returns `TC_ACT_UNSPEC`).
pub const BENCH_NOOP: &str = "bench_noop";
/// The plain 5-tuple counter.
pub const BENCH_COUNTER: &str = "bench_counter";
/// Every TC program of the object.
pub const PROGRAMS: [&str; 2] = [BENCH_NOOP, BENCH_COUNTER];
/// The raw tracepoint program on `kfree_skb` that does nothing.
pub const BENCH_KFREE_NOOP: &str = "bench_kfree_noop";
/// The raw tracepoint program on `kfree_skb` that counts drops per reason in `BASELINE_DROPS`.
pub const BENCH_KFREE_COUNT: &str = "bench_kfree_count";
/// The tracepoint programs (all on `kfree_skb`).
pub const KFREE_PROGRAMS: [&str; 2] = [BENCH_KFREE_NOOP, BENCH_KFREE_COUNT];
/// `bench_kfree_count`'s per-CPU array: drops per reason (low 8 bits), `u64`.
pub const BASELINE_DROPS: &str = "BASELINE_DROPS";
/// `bench_counter`'s per-CPU hash: 16-byte key (source and destination address, source and
/// destination port, all in network order, then the protocol and 3 padding bytes), `u64`
/// packets.
pub const BASELINE_FLOWS: &str = "BASELINE_FLOWS";

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol};

    /// The names the bench and the tests use are the object's.
    #[test]
    fn names_are_the_objects() {
        let obj = object::File::parse(super::OBJECT).expect("the embedded object is ELF");
        let in_section = |section: &str| -> Vec<String> {
            let Some(index) = obj.section_by_name(section).map(|s| s.index()) else {
                return Vec::new();
            };
            let mut names: Vec<String> = obj
                .symbols()
                .filter(|s| s.section_index() == Some(index) && s.is_global())
                .filter_map(|s| s.name().ok().map(String::from))
                .collect();
            names.sort();
            names
        };
        let mut programs = super::PROGRAMS.map(String::from).to_vec();
        programs.sort();
        assert_eq!(in_section("classifier"), programs);
        let mut maps = [super::BASELINE_DROPS, super::BASELINE_FLOWS];
        maps.sort();
        assert_eq!(in_section("maps"), maps);
        let mut kfree = super::KFREE_PROGRAMS.map(String::from).to_vec();
        kfree.sort();
        assert_eq!(in_section("raw_tp/kfree_skb"), kfree);
    }
}
