//! The benchmark's reference programs (`flowtrace-ebpf-baselines`, built by `build.rs`):
//! `bench_noop`, the floor of a TC program run, and `bench_counter`, a plain IPv4 5-tuple
//! counter in `BASELINE_FLOWS`. `cargo xtask bench`/`microbench` measure flowtrace against
//! them; an integration test attaches one as a neighbour of flowtrace's programs.

/// The object built from `flowtrace-ebpf-baselines`.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowtrace-baselines"));

/// The program that does nothing (returns `TC_ACT_UNSPEC`).
pub const BENCH_NOOP: &str = "bench_noop";
/// The plain 5-tuple counter.
pub const BENCH_COUNTER: &str = "bench_counter";
/// Every program of the object.
pub const PROGRAMS: [&str; 2] = [BENCH_NOOP, BENCH_COUNTER];
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
        assert_eq!(in_section("maps"), [super::BASELINE_FLOWS]);
    }
}
