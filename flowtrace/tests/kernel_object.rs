//! The names user space opens the kernel object's maps and programs by
//! (`flowtrace_common::maps`, `flowtrace_common::programs`) are exactly the object's.
//!
//! aya-ebpf's `#[map(name = ...)]` takes only a string literal, so the kernel's statics cannot
//! use the constants; this test keeps the two spellings together. It reads the object
//! `build.rs` left in OUT_DIR, the one the agent embeds.

use object::{Object, ObjectSection, ObjectSymbol};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowtrace"));

/// The global symbols defined in `section`, sorted.
fn symbols_in(obj: &object::File<'_>, section: &str) -> Vec<String> {
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
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    v.sort();
    v
}

#[test]
fn every_map_name_is_a_map_of_the_object_and_back() {
    let obj = object::File::parse(EBPF_OBJECT).expect("the built object is ELF");
    assert_eq!(
        symbols_in(&obj, "maps"),
        sorted(&flowtrace_common::maps::ALL),
        "the kernel's map statics (flowtrace-ebpf/src/maps.rs) and flowtrace_common::maps differ"
    );
}

#[test]
fn every_program_name_is_a_program_of_the_object_and_back() {
    let obj = object::File::parse(EBPF_OBJECT).expect("the built object is ELF");
    assert_eq!(
        symbols_in(&obj, "classifier"),
        sorted(
            &[
                flowtrace_common::programs::ALL.as_slice(),
                &[flowtrace_common::programs::SLOW],
            ]
            .concat()
        ),
        "the kernel's #[classifier] functions and flowtrace_common::programs differ"
    );
}

#[test]
fn every_tracepoint_program_is_in_its_raw_tracepoint_section() {
    let obj = object::File::parse(EBPF_OBJECT).expect("the built object is ELF");
    for (program, tracepoint) in flowtrace_common::programs::TRACEPOINTS {
        assert_eq!(
            symbols_in(&obj, &format!("raw_tp/{tracepoint}")),
            vec![program.to_string()],
            "the kernel's #[raw_tracepoint] functions and flowtrace_common::programs::TRACEPOINTS differ"
        );
    }
}
