//! Every conformance vector assembles, and where a vector gives its encoding (`-- raw`),
//! ours is the same bytes.

use appcode::asm::assemble;
use appcode::insn;
use appcode::vectors::{self, Vector};

#[test]
fn every_conformance_vector_assembles_to_its_reference_encoding() {
    let dir = match vectors::dir() {
        Ok(d) => d,
        Err(why) => return println!("skipped: {why}"),
    };
    let files = vectors::files(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert!(
        files.len() > 300,
        "expected the whole suite in {}",
        dir.display()
    );
    let mut with_raw = 0;
    for path in &files {
        let v = Vector::parse(&std::fs::read_to_string(path).unwrap());
        let prog = assemble(&v.asm).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!prog.is_empty(), "{}", path.display());
        if let Some(raw) = &v.raw {
            with_raw += 1;
            let ours: Vec<u64> = insn::encode(&prog)
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(&ours, raw, "{}", path.display());
        }
    }
    assert!(with_raw > 0, "no vector carried a reference encoding");
}
