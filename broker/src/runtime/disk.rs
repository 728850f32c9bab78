//! A core server's data directory: where its [`HardState`] survives a
//! restart.
//!
//! The directory holds one file, `hard-state.cbor`: a small CBOR envelope
//! `{version, state, crc32}` around the CBOR-encoded hard state, so that a
//! later format is recognised as such and a damaged file is told apart from
//! a valid one. The group decides what the hard state is and when it
//! changes (`Group::poll_hard_state`); this module only keeps it.
//!
//! # Invariants
//! - [`save`] replaces the file atomically and durably: a crash at any point
//!   leaves either the old state or the new one, never a mix, and once it
//!   returns the new state survives a power loss. The group sends a promise
//!   only after that (docs/DESIGN.md guarantee 7 rests on promises not being
//!   forgotten).
//! - [`load`] returns `None` only when there is no file: a file that cannot
//!   be read, is damaged or is of an unknown version is an error, never a
//!   silent fresh start. (A fresh start makes a server that promised
//!   something forget it.)

use crate::core::group::HardState;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file in the data directory.
pub const FILE_NAME: &str = "hard-state.cbor";
/// Where [`save`] writes before it renames over [`FILE_NAME`].
const TEMP_NAME: &str = "hard-state.cbor.tmp";
/// The envelope's format version that this build writes and reads.
const VERSION: u64 = 1;
/// Bytes a hard state file may have: a view of 15 members is far below.
const FILE_LEN_MAX: u64 = 1 << 20;

/// The path of the hard state file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads the hard state kept in `dir`.
///
/// `Ok(None)` when `dir` or its file does not exist: the server has never
/// run with this directory (or lost it), and starts as a new server.
///
/// # Errors
/// Naming the file, when it exists but cannot be read, is damaged, or was
/// written in a format version this build does not know.
pub fn load(dir: &Path) -> anyhow::Result<Option<HardState>> {
    let file = path(dir);
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the hard state {}", file.display()))
        }
    };
    decode(&bytes)
        .with_context(|| {
            format!(
                "the hard state {} cannot be used (the server would forget what it \
             promised; restore the file, or remove {} to make this server join \
             as a new one)",
                file.display(),
                dir.display()
            )
        })
        .map(Some)
}

/// Writes `hard` into `dir` durably, replacing what was there atomically.
///
/// Creates `dir` (and its parents) if missing, writes a temporary file next
/// to the target, syncs it, renames it over the target, and syncs the
/// directory (and every directory it created) so the rename survives a
/// power loss. It blocks on the disk: a few fsyncs.
///
/// # Errors
/// When any step fails, naming the path it failed on; the file then holds
/// the old state (or none).
pub fn save(dir: &Path, hard: &HardState) -> std::io::Result<()> {
    let created = create_dir_durable(dir).map_err(at(dir))?;
    let bytes = encode(hard)?;
    let temp = dir.join(TEMP_NAME);
    let write = |bytes: &[u8]| {
        let mut f = File::create(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write(&bytes).map_err(at(&temp))?;
    std::fs::rename(&temp, path(dir)).map_err(at(&temp))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at(dir))?;
    // A directory this call made is durable once its parent's entry is.
    for d in created {
        File::open(&d).and_then(|f| f.sync_all()).map_err(at(&d))?;
    }
    Ok(())
}

/// Adds `path` to an I/O error's message, keeping its kind.
fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Creates `dir` and its missing ancestors; returns the parents whose
/// entries changed (to be synced once the new directories hold data).
fn create_dir_durable(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .filter(|d| !d.as_os_str().is_empty())
        .take_while(|d| !d.is_dir())
        .collect();
    std::fs::create_dir_all(dir)?;
    Ok(missing
        .iter()
        .map(|d| match d.parent() {
            // A relative path's last ancestor is "": the working directory.
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect())
}

/// The envelope as written.
#[derive(serde::Serialize, Deserialize)]
struct Envelope {
    version: u64,
    /// The CBOR of the [`HardState`].
    state: ciborium::Value,
    /// CRC-32 (IEEE) of `state`'s bytes.
    crc32: u32,
}

/// Any version's envelope, read for its version only.
#[derive(Deserialize)]
struct Versioned {
    version: u64,
}

fn encode(hard: &HardState) -> std::io::Result<Vec<u8>> {
    let mut state = Vec::new();
    ciborium::into_writer(hard, &mut state).map_err(std::io::Error::other)?;
    let envelope = Envelope {
        version: VERSION,
        crc32: crc32(&state),
        state: ciborium::Value::Bytes(state),
    };
    let mut bytes = Vec::new();
    ciborium::into_writer(&envelope, &mut bytes).map_err(std::io::Error::other)?;
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> anyhow::Result<HardState> {
    if bytes.len() as u64 > FILE_LEN_MAX {
        bail!("{} bytes, more than a hard state ever takes", bytes.len());
    }
    let Versioned { version } = one_item(bytes).context("not a hard state envelope")?;
    if version != VERSION {
        bail!("format version {version}, and this build reads version {VERSION} only");
    }
    let envelope: Envelope = one_item(bytes).context("damaged envelope")?;
    let state = match envelope.state {
        ciborium::Value::Bytes(b) => b,
        _ => bail!("damaged envelope: the state is not a byte string"),
    };
    let crc = crc32(&state);
    if crc != envelope.crc32 {
        bail!(
            "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
            envelope.crc32
        );
    }
    one_item(&state).context("damaged state")
}

/// Decodes exactly one CBOR item filling all of `bytes`.
fn one_item<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> anyhow::Result<T> {
    let mut rest = bytes;
    let value = ciborium::from_reader(&mut rest)?;
    if !rest.is_empty() {
        bail!("{} bytes after the end", rest.len());
    }
    Ok(value)
}

/// CRC-32 (IEEE 802.3, as zlib computes it).
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::group::{Incarnation, Member, NodeId, View, ViewId};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory under the system's temp folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            TempDir(std::env::temp_dir().join(format!(
                "canopy-disk-{}-{}-{name}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn state(epoch: u64) -> HardState {
        let member = |n, i| Member {
            node: NodeId(n),
            incarnation: Incarnation(i),
        };
        HardState {
            incarnation: Incarnation(1_700_000_000_000_000 + epoch),
            promised: ViewId {
                epoch: epoch + 1,
                coordinator: NodeId(2),
            },
            accepted: Some(View {
                id: ViewId {
                    epoch,
                    coordinator: NodeId(1),
                },
                members: vec![member(1, 10), member(2, 20), member(3, 30)],
                stream: 0xfeed,
            }),
            ..HardState::default()
        }
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_saved_state_loads_back_equal_and_a_newer_one_replaces_it() {
        let dir = TempDir::new("round-trip");
        // Nested and missing: `save` creates it.
        let data = dir.0.join("a/b");
        save(&data, &HardState::default()).expect("save");
        assert_eq!(load(&data).expect("load"), Some(HardState::default()));
        save(&data, &state(7)).expect("save");
        assert_eq!(load(&data).expect("load"), Some(state(7)));
        save(&data, &state(8)).expect("save again");
        assert_eq!(load(&data).expect("load"), Some(state(8)));
        assert!(!data.join(TEMP_NAME).exists(), "the temporary file is gone");
    }

    #[test]
    fn a_missing_directory_or_file_is_a_new_server() {
        let dir = TempDir::new("missing");
        assert_eq!(load(&dir.0).expect("no directory"), None);
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        assert_eq!(load(&dir.0).expect("no file"), None);
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = TempDir::new("corrupt");
        save(&dir.0, &state(3)).expect("save");
        let good = std::fs::read(path(&dir.0)).expect("read");
        let mut flipped = good.clone();
        // A bit inside the state (the envelope's last bytes are the CRC).
        let at = good.len() / 2;
        flipped[at] ^= 0x10;
        let mut trailing = good.clone();
        trailing.push(0);
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("garbage", b"\xde\xad\xbe\xef not cbor".to_vec()),
            ("truncated", good[..good.len() - 3].to_vec()),
            ("a flipped bit", flipped),
            ("trailing bytes", trailing),
        ] {
            std::fs::write(path(&dir.0), &bytes).expect("write");
            let err = load(&dir.0).expect_err(what);
            let text = format!("{err:#}");
            assert!(
                text.contains(&path(&dir.0).display().to_string()),
                "{what}: {text}"
            );
        }
    }

    #[test]
    fn an_unknown_version_is_an_error_saying_so() {
        let dir = TempDir::new("version");
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        let mut bytes = Vec::new();
        let future = serde_json::json!({"version": 2, "state": "whatever"});
        ciborium::into_writer(&future, &mut bytes).expect("encode");
        std::fs::write(path(&dir.0), &bytes).expect("write");
        let text = format!("{:#}", load(&dir.0).expect_err("version 2"));
        assert!(text.contains("version 2"), "{text}");
        assert!(text.contains(FILE_NAME), "{text}");
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_a_new_server() {
        let dir = TempDir::new("unreadable");
        // A directory where the file should be: it exists and cannot be read.
        std::fs::create_dir_all(path(&dir.0)).expect("mkdir");
        let text = format!("{:#}", load(&dir.0).expect_err("a directory"));
        assert!(text.contains(FILE_NAME), "{text}");
    }

    #[test]
    fn a_failed_save_leaves_the_old_state() {
        let dir = TempDir::new("failed-save");
        save(&dir.0, &state(4)).expect("save");
        // The temporary file cannot be created: a directory is in the way.
        std::fs::create_dir_all(dir.0.join(TEMP_NAME).join("x")).expect("mkdir");
        let err = save(&dir.0, &state(5)).expect_err("the temporary file cannot be written");
        assert!(err.to_string().contains(TEMP_NAME), "{err}");
        assert_eq!(load(&dir.0).expect("load"), Some(state(4)));
    }
}
