//! What the costliest program shapes take to verify and compile on the checked engine, at
//! the translator's bounds (and one past them, refused before compiling):
//!
//! ```sh
//! cargo run --release -p appcode --example compile_cost
//! ```
//!
//! The numbers in `docs/security.md` ("Compile time is bounded before compiling") come
//! from this. Build it in release: a debug build also runs Cranelift's IR verifier.

#[path = "../tests/common/shapes.rs"]
mod shapes;

use std::time::Instant;

use appcode::insn::Insn;
use appcode::{Mode, Program};

fn main() {
    let n = appcode::verify::MAX_INSNS;
    // The largest run of loads resolved by calls that fits the bound on blocks × values.
    let resolved = (n / 2..=n)
        .rev()
        .step_by(1024)
        .find(|&k| Program::from_insns("probe", &shapes::resolved_loads(k), Mode::Checked).is_ok())
        .unwrap_or(n / 2);
    let cases: Vec<(String, Vec<Insn>)> = vec![
        (
            "checked accesses, 65536 slots".into(),
            shapes::checked_accesses(n),
        ),
        (
            "4096 loop heads, registers live".into(),
            shapes::loop_heads(n, 4096),
        ),
        (
            "4095 jumps into one slot".into(),
            shapes::jumps_into_one(n, 4095),
        ),
        (
            format!("{resolved} loads resolved by calls"),
            shapes::resolved_loads(resolved),
        ),
        (
            "65534 loop heads (refused)".into(),
            shapes::loop_heads(n, n),
        ),
        (
            "65536 loads resolved by calls (refused)".into(),
            shapes::resolved_loads(n),
        ),
    ];
    println!(
        "{:<44} {:>10} {:>10}  outcome",
        "shape", "load ms", "compile ms"
    );
    for (name, insns) in cases {
        let start = Instant::now();
        let p = Program::from_insns(&name, &insns, Mode::Checked);
        let load = start.elapsed().as_secs_f64() * 1e3;
        match p {
            Ok(p) => println!(
                "{name:<44} {load:>10.1} {:>10.1}  compiled",
                p.compile_time().as_secs_f64() * 1e3
            ),
            Err(e) => println!("{name:<44} {load:>10.1} {:>10}  {e}", "-"),
        }
    }
}
