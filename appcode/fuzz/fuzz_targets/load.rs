//! Any bytes as an ELF object: loading, inlining and verifying must return, not panic.
#![no_main]

use appcode::elf;
use appcode::program;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(loaded) = elf::load(data) {
        for linked in &loaded.programs {
            let _ = program::prepare(linked, &loaded, Default::default());
        }
    }
});
