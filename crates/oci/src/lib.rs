//! OCI domain types: [`Digest`], [`RepoName`], [`Tag`], [`Reference`] and manifest media types.
//!
//! Everything here is pure: no I/O, no async. Strings from the network are parsed into these
//! types once, at the HTTP edge, and nothing below `http` takes a digest, name or reference as
//! `&str`. The grammars are those of the OCI distribution specification, so a value of one of
//! these types is always safe to use as a path component or a sled key.

mod manifest;
mod name;
mod walk;

pub use manifest::{
    declared_sizes, is_runnable, manifest_digest, references, schema1_payload, sniff_media_type,
    validate_manifest, InvalidManifest, MediaType, MAX_MANIFEST_BYTES,
};
pub use name::{Digest, ParseError, Reference, RepoName, Tag};
pub use walk::ImageWalk;
