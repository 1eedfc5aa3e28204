//! The memory a program may touch, and the one place where a program's address becomes host
//! memory.
//!
//! Programs never see host addresses. On the checked engine every run's memory is one arena
//! at fixed *guest* addresses — context, data window, scratch, argument and stack — and a
//! program's read-only globals sit in one blob at their own guest address. A load, a store
//! or a helper's memory argument is a guest address that is checked against one of these
//! areas before it is turned into a host pointer, so whatever a program computes, it can
//! only reach its own run's memory and its own globals. Even a pointer leaked past a
//! verifier bug says nothing about the daemon's address space.
//!
//! The areas lie between 2^30 and 2^31: a pointer moved by the verifier's largest variable
//! offset (±2^29, [`crate::verify::MAX_OFFSET`]) stays between 2^29 and 2^31, so it can
//! neither wrap nor change sign, and comparing two addresses in one area, signed or
//! unsigned, compares their offsets. (Below 2^31 they also fit the immediates of x86-64
//! instructions, which keeps every bounds check one compare.)

use std::alloc::{self, Layout};
use std::ops::Range;
use std::ptr::NonNull;

use crate::abi::{self, STACK_SIZE};

/// Guest addresses of the run's areas.
pub mod guest {
    use crate::abi;

    pub const CTX: u64 = 1 << 30;
    pub const WINDOW: u64 = CTX + 0x1000;
    pub const SCRATCH: u64 = CTX + 0x2000;
    pub const ARG: u64 = CTX + 0x3000;
    pub const STACK: u64 = CTX + 0x4000;
    /// r10 on entry: one past the stack.
    pub const STACK_TOP: u64 = STACK + abi::STACK_SIZE as u64;
    /// Where the program's read-only globals start.
    pub const GLOBALS: u64 = CTX + (1 << 28);
}

/// Bytes of read-only globals one program may have (all sections together).
pub const MAX_GLOBALS: usize = 16 << 20;

/// One area of a run's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    Ctx,
    Window,
    Scratch,
    Arg,
    Stack,
}

impl Area {
    pub const ALL: [Area; 5] = [
        Area::Ctx,
        Area::Window,
        Area::Scratch,
        Area::Arg,
        Area::Stack,
    ];

    /// The area's guest addresses.
    pub fn span(self) -> Range<u64> {
        let (start, len) = match self {
            Area::Ctx => (guest::CTX, abi::ctx::SIZE),
            Area::Window => (guest::WINDOW, abi::WINDOW_SIZE),
            Area::Scratch => (guest::SCRATCH, abi::SCRATCH_SIZE),
            Area::Arg => (guest::ARG, abi::ARG_SIZE),
            Area::Stack => (guest::STACK, STACK_SIZE),
        };
        start..start + len as u64
    }

    /// Whether helpers may write it. (Of the context, programs may store only to
    /// `ctx->next`, which the engine checks on its own.)
    pub fn helper_writable(self) -> bool {
        matches!(self, Area::Scratch | Area::Stack)
    }

    fn offset(self) -> usize {
        (self.span().start - guest::CTX) as usize
    }
}

/// Bytes from the context's guest address to the end of the stack.
pub const ARENA_SIZE: usize = (guest::STACK_TOP - guest::CTX) as usize;

/// A run's memory: every area at its guest address minus [`guest::CTX`]. Each thread keeps
/// one and reuses it run after run (see `program.rs`); the run loop clears what must not
/// pass from one run, or one invocation, to the next.
///
/// The memory is reached through a raw pointer only: engine code and helpers use it while
/// no Rust reference to it is alive, and the run loop's slices live between invocations.
pub struct Arena {
    base: NonNull<u8>,
}

const ARENA_LAYOUT: Layout = match Layout::from_size_align(ARENA_SIZE, 4096) {
    Ok(l) => l,
    Err(_) => panic!("arena layout"),
};

impl Arena {
    pub fn new() -> Arena {
        // SAFETY: the layout has a nonzero size.
        let p = unsafe { alloc::alloc_zeroed(ARENA_LAYOUT) };
        let Some(base) = NonNull::new(p) else {
            alloc::handle_alloc_error(ARENA_LAYOUT)
        };
        Arena { base }
    }

    /// The host address of guest address [`guest::CTX`].
    pub fn host(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// One area's bytes, for the run loop between invocations.
    pub fn area(&mut self, area: Area) -> &mut [u8] {
        let len = (area.span().end - area.span().start) as usize;
        // SAFETY: the area lies inside the allocation (ARENA_SIZE covers every area), and
        // `&mut self` means no engine or helper is using the arena now.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(area.offset()), len) }
    }

    /// Writes a little-endian u64 context field.
    pub fn set_ctx(&mut self, field: i16, v: u64) {
        let at = field as usize;
        self.area(Area::Ctx)[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    pub fn ctx(&mut self, field: i16) -> u64 {
        let at = field as usize;
        u64::from_le_bytes(
            self.area(Area::Ctx)[at..at + 8]
                .try_into()
                .expect("8 bytes"),
        )
    }
}

impl Default for Arena {
    fn default() -> Self {
        Arena::new()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::dealloc(self.base.as_ptr(), ARENA_LAYOUT) };
    }
}

/// A program's read-only globals: every section it refers to, 8-byte aligned, in one blob
/// at guest address [`guest::GLOBALS`].
#[derive(Debug, Default)]
pub struct Globals {
    bytes: Box<[u8]>,
    /// Each section's bytes within `bytes`, by global id.
    spans: Vec<Range<usize>>,
}

impl Globals {
    /// Lays out `sections`; `None` if together they exceed [`MAX_GLOBALS`].
    pub fn new<'s>(sections: impl IntoIterator<Item = &'s [u8]>) -> Option<Globals> {
        let mut bytes = Vec::new();
        let mut spans = Vec::new();
        for s in sections {
            let start = bytes.len().next_multiple_of(8);
            if start + s.len() > MAX_GLOBALS {
                return None;
            }
            bytes.resize(start, 0);
            bytes.extend_from_slice(s);
            spans.push(start..bytes.len());
        }
        Some(Globals {
            bytes: bytes.into_boxed_slice(),
            spans,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The guest addresses of global `id`.
    pub fn span(&self, id: usize) -> Option<Range<u64>> {
        let s = self.spans.get(id)?;
        Some(guest::GLOBALS + s.start as u64..guest::GLOBALS + s.end as u64)
    }

    /// Where global `id` starts in the blob.
    pub fn offset(&self, id: usize) -> Option<usize> {
        Some(self.spans.get(id)?.start)
    }
}

/// How a helper's pointer arguments are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Guest addresses, each checked against the areas and the globals (the checked engine).
    Guest,
    /// Host addresses (rbpf's engines): checked against the arena and the globals; any
    /// other address is taken to be rbpf's own stack, which nearfs cannot see, and trusted
    /// as the verifier proved it. This is why rbpf's engines are for reference and
    /// measurement only, never for programs from users.
    Host,
}

/// The memory of one invocation, as helpers see it.
pub struct Memory<'a> {
    arena: *mut u8,
    globals: &'a [u8],
    addressing: Addressing,
}

impl<'a> Memory<'a> {
    /// # Safety
    /// `arena` is the host address of a live [`Arena`], not accessed through any
    /// reference while this `Memory` or a slice from it is in use.
    pub unsafe fn new(arena: *mut u8, globals: &'a [u8], addressing: Addressing) -> Memory<'a> {
        Memory {
            arena,
            globals,
            addressing,
        }
    }

    /// Where `len` bytes at `addr` lie: an offset in the arena (`Ok`) or in the globals
    /// (`Err`), or `None` if they leave every area. Writable only finds scratch and stack.
    fn locate(&self, addr: u64, len: u64, write: bool) -> Option<Place> {
        let inside = |span: Range<u64>| {
            addr.checked_sub(span.start).filter(|&o| {
                o <= (span.end - span.start).saturating_sub(len) && len <= span.end - span.start
            })
        };
        let (arena, globals) = match self.addressing {
            Addressing::Guest => (guest::CTX, guest::GLOBALS),
            Addressing::Host => (self.arena as u64, self.globals.as_ptr() as u64),
        };
        for area in Area::ALL {
            if write && !area.helper_writable() {
                continue;
            }
            let span = area.span();
            let host = span.start - guest::CTX + arena..span.end - guest::CTX + arena;
            if let Some(o) = inside(host) {
                return Some(Place::Arena(area.offset() + o as usize));
            }
        }
        if !write && let Some(o) = inside(globals..globals + self.globals.len() as u64) {
            return Some(Place::Globals(o as usize));
        }
        match self.addressing {
            Addressing::Host if len <= STACK_SIZE as u64 => Some(Place::Trusted(addr)),
            _ => None,
        }
    }

    /// `len` bytes at `addr` that the program may read; `None` if they leave its memory.
    pub fn read(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let p = match self.locate(addr, len, false)? {
            // SAFETY: `locate` found the bytes inside the arena (see `new`).
            Place::Arena(o) => unsafe { self.arena.add(o) },
            Place::Globals(o) => return self.globals.get(o..o + len as usize),
            Place::Trusted(a) => a as *mut u8,
        };
        // SAFETY: `p` names `len` bytes of the arena, not otherwise referenced during the
        // helper call, or (Host addressing) stack bytes rbpf gave the verified program.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    /// `len` bytes at `addr` that the program may write (scratch or stack).
    pub fn write(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
        let p = match self.locate(addr, len, true)? {
            // SAFETY: as in `read`.
            Place::Arena(o) => unsafe { self.arena.add(o) },
            Place::Globals(_) => return None,
            Place::Trusted(a) => a as *mut u8,
        };
        // SAFETY: as in `read`; `&mut self` keeps other slices of this memory from living
        // alongside this one.
        Some(unsafe { std::slice::from_raw_parts_mut(p, len as usize) })
    }
}

enum Place {
    Arena(usize),
    Globals(usize),
    Trusted(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_addresses_reach_only_their_area() {
        let mut arena = Arena::new();
        arena.area(Area::Scratch)[..4].copy_from_slice(b"abcd");
        let globals = Globals::new([&b"xyz"[..], &b"0123456789"[..]]).unwrap();
        // SAFETY: nothing else uses the arena while `mem` lives.
        let mut mem = unsafe { Memory::new(arena.host(), globals.bytes(), Addressing::Guest) };
        assert_eq!(mem.read(guest::SCRATCH, 4), Some(&b"abcd"[..]));
        let g1 = globals.span(1).unwrap();
        assert_eq!(g1.start, guest::GLOBALS + 8);
        assert_eq!(mem.read(g1.start + 2, 3), Some(&b"234"[..]));
        // Straddling the end of an area, or of everything, or wrapping: refused.
        assert!(mem.read(guest::SCRATCH + 4093, 4).is_none());
        assert!(mem.read(guest::STACK_TOP - 1, 2).is_none());
        assert!(mem.read(u64::MAX - 1, 4).is_none());
        assert!(mem.read(guest::CTX - 1, 1).is_none());
        assert!(mem.read(guest::GLOBALS + 18, 1).is_none());
        // Host addresses mean nothing in guest addressing.
        assert!(mem.read(arena.host() as u64 + 0x2000, 1).is_none());
        // Writes: scratch and stack only.
        assert!(mem.write(guest::STACK_TOP - 8, 8).is_some());
        assert!(mem.write(guest::WINDOW, 1).is_none());
        assert!(mem.write(guest::CTX + 80, 8).is_none());
        assert!(mem.write(g1.start, 1).is_none());
        assert!(mem.write(guest::SCRATCH, 0).is_some());
    }

    #[test]
    fn globals_are_capped() {
        let big = vec![0u8; MAX_GLOBALS / 2 + 1];
        assert!(Globals::new([&big[..], &big[..]]).is_none());
        assert!(Globals::new([&big[..]]).is_some());
    }
}
