//! The index: records, corruption handling, locking.

use super::*;

#[test]
fn records_survive_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index");
    let namespace = Namespace::new("r.test");
    let repo = RepoName::parse("a/b").expect("valid");
    let tag = Tag::parse("v1").expect("valid");
    let digest = Digest::of(b"x");
    let confirmed_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    {
        let (index, aside) =
            Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("open");
        assert!(aside.is_none());
        index
            .put_tag(
                &namespace,
                &repo,
                &tag,
                &TagRecord {
                    digest,
                    confirmed_at,
                },
            )
            .expect("put tag");
        let media_type = MediaType::from_static(MediaType::OCI_MANIFEST);
        index
            .put_manifest(&namespace, &digest, &ManifestRecord { media_type })
            .expect("put manifest");
        index.flush().expect("flush");
    }
    let (index, _) = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("reopen");
    let record = index.tag(&namespace, &repo, &tag).expect("read");
    assert_eq!(
        record,
        Some(TagRecord {
            digest,
            confirmed_at
        })
    );
    let manifest = index.manifest(&namespace, &digest).expect("read");
    assert_eq!(
        manifest.map(|m| m.media_type.to_string()).as_deref(),
        Some(MediaType::OCI_MANIFEST)
    );
}

#[test]
fn a_locked_database_is_an_error_not_corruption() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index");
    let (_held, _) = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("open");
    let second = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES);
    let Err(StoreError::IndexLocked { holder, .. }) = &second else {
        panic!("a second open must fail as locked, not start fresh: {second:?}");
    };
    assert_eq!(*holder, Some(std::process::id()), "the holder is named");
    let message = second.err().map(|err| err.to_string()).unwrap_or_default();
    assert!(
        message.contains(&format!(
            "running regcache server (PID {})",
            std::process::id()
        )),
        "{message}"
    );
    assert!(
        std::fs::read_dir(dir.path()).expect("list").count() == 1,
        "nothing was moved aside"
    );
}

#[test]
fn corrupt_database_is_moved_aside() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index");
    {
        let (index, _) = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("open");
        index.flush().expect("flush");
    }
    // Overwrite every file of the database with garbage.
    for entry in std::fs::read_dir(&path).expect("list") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::write(entry.path(), b"garbage garbage garbage").expect("write");
        }
    }
    let (_index, aside) =
        Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("opens fresh");
    let aside = aside.expect("the corrupt database was moved aside");
    assert!(aside.exists());
}

#[test]
fn repository_tags_are_sorted_and_scoped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (index, _) = Index::open(
        &dir.path().join("index"),
        OnCorrupt::MoveAside,
        TEST_CACHE_BYTES,
    )
    .expect("open");
    let namespace = Namespace::new("r.test");
    let record = TagRecord {
        digest: Digest::of(b"x"),
        confirmed_at: UNIX_EPOCH,
    };
    for (repo, tag) in [
        ("a", "v2"),
        ("a", "v10"),
        ("a", "latest"),
        ("a/b", "x"),
        ("ab", "y"),
    ] {
        let repo = RepoName::parse(repo).expect("valid");
        let tag = Tag::parse(tag).expect("valid");
        index
            .put_tag(&namespace, &repo, &tag, &record)
            .expect("put");
    }
    let repo = RepoName::parse("a").expect("valid");
    let tags = index.repository_tags(&namespace, &repo).expect("list");
    let tags: Vec<&str> = tags.iter().map(Tag::as_str).collect();
    assert_eq!(tags, ["latest", "v10", "v2"]);
}

#[test]
fn referrers_are_listed_by_subject() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (index, _) = Index::open(
        &dir.path().join("index"),
        OnCorrupt::MoveAside,
        TEST_CACHE_BYTES,
    )
    .expect("open");
    let namespace = Namespace::new("r.test");
    let repo = RepoName::parse("a").expect("valid");
    let subject = Digest::of(b"subject");
    let record = ReferrerRecord {
        digest: Digest::of(b"signature"),
        media_type: MediaType::from_static(MediaType::OCI_MANIFEST),
        size: 42,
        artifact_type: Some("application/example".to_owned()),
        annotations: [("k".to_owned(), "v".to_owned())].into(),
    };
    index
        .put_referrer(&namespace, &repo, &subject, &record)
        .expect("put");
    assert_eq!(
        index.referrers(&namespace, &repo, &subject).expect("list"),
        [record]
    );
    let other = Digest::of(b"other");
    assert!(index
        .referrers(&namespace, &repo, &other)
        .expect("list")
        .is_empty());
}

#[test]
fn memberships_are_scoped_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index");
    let namespace = Namespace::new("r.test");
    let other_namespace = Namespace::new("other.test");
    let repo = RepoName::parse("a").expect("valid");
    let digest = Digest::of(b"layer");
    {
        let (index, _) = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("open");
        assert!(!index.is_member(&namespace, &repo, &digest).expect("read"));
        index
            .put_membership(&namespace, &repo, &digest, SystemTime::now())
            .expect("put");
        // Confirming again is harmless.
        index
            .put_membership(&namespace, &repo, &digest, SystemTime::now())
            .expect("put again");
        index.flush().expect("flush");
    }
    let (index, _) = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("reopen");
    assert!(index.is_member(&namespace, &repo, &digest).expect("read"));
    // Another digest, another repository (a prefix of it, or one it is a prefix of) or
    // another upstream: not a member.
    let not_members = [
        (&namespace, "a", Digest::of(b"other")),
        (&namespace, "a/b", digest),
        (&namespace, "ab", digest),
        (&other_namespace, "a", digest),
    ];
    for (namespace, repo, digest) in not_members {
        let repo = RepoName::parse(repo).expect("valid");
        assert!(
            !index.is_member(namespace, &repo, &digest).expect("read"),
            "{repo} {digest}"
        );
    }
    let shorter = RepoName::parse("a").expect("valid");
    let longer = RepoName::parse("a/b").expect("valid");
    index
        .put_membership(&namespace, &longer, &digest, SystemTime::now())
        .expect("put");
    assert!(index.is_member(&namespace, &longer, &digest).expect("read"));
    assert!(index
        .is_member(&namespace, &shorter, &digest)
        .expect("read"));
    assert!(!index
        .is_member(
            &namespace,
            &RepoName::parse("a/b/c").expect("valid"),
            &digest
        )
        .expect("read"));
}

/// Writes `records` as an index before compact keys did: text keys in the `access` tree.
fn write_legacy_access(path: &Path, records: &[(Namespace, Digest, AccessRecord)]) {
    let db = sled::open(path).expect("sled");
    let tree = db.open_tree(LEGACY_ACCESS_TREE).expect("tree");
    for (namespace, digest, record) in records {
        tree.insert(manifest_key(namespace, digest), &encode_access(*record)[..])
            .expect("insert");
    }
    db.flush().expect("flush");
}

/// Every access record the index streams, decoded.
fn all_access(index: &Index) -> Vec<(Namespace, Digest, AccessRecord)> {
    let mut all = Vec::new();
    index
        .for_each_access(|entry| {
            let (namespace, digest) = entry.blob().expect("decodable key");
            all.push((namespace, digest, entry.record));
        })
        .expect("scan");
    all.sort_by_key(|(_, digest, _)| *digest);
    all
}

#[test]
fn access_records_under_text_keys_are_read_by_every_command_and_moved_by_the_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index");
    let namespace = Namespace::new("docker.io");
    let records: Vec<_> = (0..(MAX_BATCH as u64 + 10))
        .map(|n| {
            let digest = Digest::of(&n.to_le_bytes());
            let record = AccessRecord {
                size: n,
                last_access: 1000 + n,
            };
            (namespace.clone(), digest, record)
        })
        .collect();
    write_legacy_access(&path, &records);
    let mut expected = records.clone();
    expected.sort_by_key(|(_, digest, _)| *digest);

    // A command that may not migrate reads and removes them where they are.
    {
        let (index, _) = Index::open(&path, OnCorrupt::Refuse, TEST_CACHE_BYTES).expect("open");
        assert_eq!(all_access(&index), expected);
        let (namespace, digest, record) = &records[3];
        assert_eq!(
            index.access(namespace, digest).expect("read"),
            Some(*record)
        );
        assert!(index.has_access(namespace, digest).expect("read"));
        index.remove_access(namespace, digest).expect("remove");
        assert!(!index.has_access(namespace, digest).expect("read"));
        index.flush().expect("flush");
    }
    expected.retain(|(_, digest, _)| *digest != records[3].1);

    // The server moves them to compact keys (more than one batch) and drops the old tree.
    {
        let (index, _) = Index::open(&path, OnCorrupt::MoveAside, TEST_CACHE_BYTES).expect("open");
        assert!(index.legacy_access.is_none());
        assert_eq!(all_access(&index), expected);
        let names = index.db.tree_names();
        assert!(!names
            .iter()
            .any(|name| &name[..] == LEGACY_ACCESS_TREE.as_bytes()));
        assert_eq!(index.access.len(), expected.len());
        index.flush().expect("flush");
    }
    let (index, _) = Index::open(&path, OnCorrupt::Refuse, TEST_CACHE_BYTES).expect("reopen");
    assert_eq!(all_access(&index), expected);
}

#[test]
fn compact_access_keys_round_trip_and_reject_other_shapes() {
    let namespace = Namespace::new("registry-1.example:5000");
    let digest = Digest::of(b"blob");
    let key = blob_key(&namespace, &digest);
    assert_eq!(key.len(), namespace.as_str().len() + 33);
    assert_eq!(parse_blob_key(&key), Some((namespace.clone(), digest)));
    assert_eq!(parse_blob_key(&key[..key.len() - 1]), None);
    assert_eq!(parse_blob_key(b"short"), None);
    assert_eq!(
        parse_legacy_key(&manifest_key(&namespace, &digest)),
        Some((namespace, digest))
    );
}
