//! One image walker for every command that follows an image from its root manifest: pins
//! (what eviction must keep, what to fetch), `regcache prefetch`, and `regcache ls`. It does no
//! I/O: the caller reads each manifest the walk asks for (from the store, through the cache,
//! from the upstream) and hands its bytes back.

use std::collections::HashSet;

use crate::{references, Digest};

/// A walk over an image: its manifests (the root, then the children of indexes for the chosen
/// platforms) and the blobs they reference (configs and layers), each once.
///
/// ```
/// # use regcache_oci::{Digest, ImageWalk};
/// # fn read(_: &Digest) -> Option<Vec<u8>> { None }
/// # let root = Digest::of(b"{}");
/// let mut walk = ImageWalk::new(root, &[]);
/// while let Some(digest) = walk.next_manifest() {
///     if let Some(bytes) = read(&digest) {
///         walk.read(&bytes);
///     }
/// }
/// let blobs = walk.into_blobs();
/// # assert!(blobs.is_empty());
/// ```
#[derive(Debug)]
pub struct ImageWalk {
    platforms: Vec<String>,
    queue: Vec<Digest>,
    seen: HashSet<Digest>,
    manifests: Vec<Digest>,
    blobs: Vec<Digest>,
    blobs_seen: HashSet<Digest>,
}

impl ImageWalk {
    /// A walk from `root`, following an index only to the children for `platforms`
    /// (`os/arch[/variant]`; empty follows all).
    pub fn new(root: Digest, platforms: &[String]) -> Self {
        Self {
            platforms: platforms.to_vec(),
            queue: vec![root],
            seen: HashSet::new(),
            manifests: Vec::new(),
            blobs: Vec::new(),
            blobs_seen: HashSet::new(),
        }
    }

    /// The next manifest to read, each digest once; `None` when the walk is done. The caller
    /// reads it and passes its bytes to [`ImageWalk::read`], or skips it (not available).
    pub fn next_manifest(&mut self) -> Option<Digest> {
        while let Some(digest) = self.queue.pop() {
            if self.seen.insert(digest) {
                self.manifests.push(digest);
                return Some(digest);
            }
        }
        None
    }

    /// Takes in the bytes of the manifest [`ImageWalk::next_manifest`] returned last: its
    /// children are walked next and its blobs noted.
    pub fn read(&mut self, bytes: &[u8]) {
        let (children, blobs) = references(bytes, &self.platforms);
        self.queue
            .extend(children.into_iter().filter(|d| !self.seen.contains(d)));
        for blob in blobs {
            if self.blobs_seen.insert(blob) {
                self.blobs.push(blob);
            }
        }
    }

    /// Adds a manifest to walk that the image does not reference itself (a referrer).
    pub fn also(&mut self, digest: Digest) {
        if !self.seen.contains(&digest) {
            self.queue.push(digest);
        }
    }

    /// Every manifest handed out so far (read or skipped), in walk order.
    pub fn manifests(&self) -> &[Digest] {
        &self.manifests
    }

    /// The blobs of the manifests read, each once, in walk order.
    pub fn into_blobs(self) -> Vec<Digest> {
        self.blobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: &[Digest]) -> Vec<u8> {
        let layers: Vec<String> = layers
            .iter()
            .map(|d| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":1}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{}]}}"#,
            Digest::of(b"config"),
            layers.join(",")
        )
        .into_bytes()
    }

    fn index(children: &[(Digest, &str)]) -> Vec<u8> {
        let children: Vec<String> = children
            .iter()
            .map(|(d, arch)| format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":1,"platform":{{"os":"linux","architecture":"{arch}"}}}}"#))
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            children.join(",")
        )
        .into_bytes()
    }

    /// Walks with `read` as the only source; returns (manifests read, blobs).
    fn walk(
        root: Digest,
        platforms: &[String],
        source: &[(Digest, Vec<u8>)],
    ) -> (usize, Vec<Digest>) {
        let mut walk = ImageWalk::new(root, platforms);
        let mut read = 0;
        while let Some(digest) = walk.next_manifest() {
            if let Some((_, bytes)) = source.iter().find(|(d, _)| *d == digest) {
                read += 1;
                walk.read(bytes);
            }
        }
        (read, walk.into_blobs())
    }

    #[test]
    fn an_index_is_walked_to_the_chosen_platforms_and_shared_blobs_count_once() {
        let (shared, amd, arm) = (
            Digest::of(b"shared"),
            Digest::of(b"amd"),
            Digest::of(b"arm"),
        );
        let amd64 = manifest(&[shared, amd]);
        let arm64 = manifest(&[shared, arm]);
        let (amd64_digest, arm64_digest) = (Digest::of(&amd64), Digest::of(&arm64));
        let root = index(&[(amd64_digest, "amd64"), (arm64_digest, "arm64")]);
        let root_digest = Digest::of(&root);
        let source = vec![
            (root_digest, root),
            (amd64_digest, amd64),
            (arm64_digest, arm64),
        ];

        let (read, blobs) = walk(root_digest, &[], &source);
        assert_eq!(read, 3);
        let config = Digest::of(b"config");
        assert_eq!(blobs.len(), 4, "config, shared, amd and arm once each");
        for blob in [config, shared, amd, arm] {
            assert!(blobs.contains(&blob), "{blob}");
        }

        let (read, blobs) = walk(root_digest, &["linux/arm64".to_owned()], &source);
        assert_eq!(read, 2, "the index and the arm64 child");
        assert!(blobs.contains(&arm) && !blobs.contains(&amd));
    }

    #[test]
    fn a_manifest_named_twice_or_missing_is_not_read_twice_or_at_all() {
        let layer = Digest::of(b"layer");
        let child = manifest(&[layer]);
        let child_digest = Digest::of(&child);
        let missing = Digest::of(b"missing");
        let root = index(&[
            (child_digest, "amd64"),
            (child_digest, "amd64"),
            (missing, "arm64"),
        ]);
        let root_digest = Digest::of(&root);
        let (read, blobs) = walk(
            root_digest,
            &[],
            &[(root_digest, root), (child_digest, child)],
        );
        assert_eq!(read, 2);
        assert_eq!(blobs, vec![Digest::of(b"config"), layer]);
    }
}
