#![no_main]
//! `keygate_core::fuzzing::path_normalisation` on arbitrary bytes: a panic or a broken property is a crash.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = keygate_core::fuzzing::path_normalisation(data) {
        panic!("{e}");
    }
});
