#![no_main]
//! `keygate_core::fuzzing::decision`: random requests against a fixed list in an in-memory store.
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

thread_local! {
    static GATE: RefCell<keygate_core::fuzzing::Gate> =
        RefCell::new(keygate_core::fuzzing::Gate::new().expect("the fuzz gate builds"));
}

fuzz_target!(|data: &[u8]| {
    GATE.with(|g| {
        if let Err(e) = keygate_core::fuzzing::decision(&mut g.borrow_mut(), data) {
            panic!("{e}");
        }
    });
});
