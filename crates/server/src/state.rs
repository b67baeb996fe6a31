//! Dynamic state that survives restarts: instances registered through the
//! admin API, weight changes, removals and strategy changes.
//!
//! With `admin.state_file` set, every change is written atomically (a temp
//! file in the same directory, fsync, rename, fsync of the directory) and
//! read back at start, on top of the config file. A corrupt or unreadable
//! file is reported, moved aside as `<file>.corrupt-<unix time>` (never
//! deleted), and the balancer starts from its config alone.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use datapunk_lb_core::{InstanceError, ServiceInstance, Weight};
use serde::{Deserialize, Serialize};

/// Current file format version.
pub(crate) const VERSION: u32 = 1;

/// Everything changed at runtime, by service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DynamicState {
    /// Format version.
    pub version: u32,
    /// Per service.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceState>,
}

/// Runtime changes of one service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceState {
    /// Strategy set through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Instances registered or updated through the API (they win over the
    /// config's instance with the same id).
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceSpec>,
    /// Config instances removed through the API.
    #[serde(default)]
    pub removed: BTreeSet<String>,
}

/// An instance as the admin API and the state file describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Weight (1..=1000).
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// Zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

fn default_weight() -> u16 {
    1
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The content is not a valid state file.
    #[error("state file {path} is corrupt: {reason}; moved aside to {moved_to}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// Where it now is.
        moved_to: PathBuf,
    },
}

impl InstanceSpec {
    /// The core description of this instance.
    pub fn to_instance(&self, id: &str) -> Result<ServiceInstance, InstanceError> {
        let mut i = ServiceInstance::try_new(id, &self.address, self.port)?
            .with_weight(Weight::try_new(u64::from(self.weight))?);
        if let Some(z) = &self.zone {
            i = i.with_zone(z.as_str());
        }
        if !self.tags.is_empty() {
            i = i.with_tags(self.tags.iter().map(String::as_str));
        }
        Ok(i)
    }
}

#[cfg(test)]
impl InstanceSpec {
    /// `127.0.0.1:port`, weight 1: the instance unit tests use.
    pub(crate) fn local(port: u16) -> Self {
        Self {
            address: "127.0.0.1".into(),
            port,
            weight: 1,
            zone: None,
            tags: vec![],
        }
    }
}

impl DynamicState {
    /// Loads `path`. A missing file is an empty state; a corrupt one is moved
    /// aside and reported as [`StateError::Corrupt`].
    pub(crate) fn load(path: &Path) -> Result<DynamicState, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DynamicState::default())
            }
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        match Self::parse(&text) {
            Ok(s) => Ok(s),
            Err(reason) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let mut moved_to = path.as_os_str().to_owned();
                moved_to.push(format!(".corrupt-{stamp}"));
                let moved_to = PathBuf::from(moved_to);
                std::fs::rename(path, &moved_to).map_err(|source| StateError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                Err(StateError::Corrupt {
                    path: path.to_owned(),
                    reason,
                    moved_to,
                })
            }
        }
    }

    /// Parses and validates a state file's text: what [`load`](Self::load)
    /// does once the file is read (the `state_file` fuzz target calls it
    /// through [`crate::fuzzing::state_file`]).
    pub(crate) fn parse(text: &str) -> Result<DynamicState, String> {
        serde_json::from_str::<DynamicState>(text)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map(|()| s))
    }

    /// The text [`save`](Self::save) writes.
    pub(crate) fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut state = self.clone();
        state.version = VERSION;
        serde_json::to_vec_pretty(&state)
    }

    fn validate(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!("unsupported version {}", self.version));
        }
        for (svc, s) in &self.services {
            for (id, spec) in &s.instances {
                spec.to_instance(id)
                    .map_err(|e| format!("services.{svc}.instances.{id}: {e}"))?;
            }
            if let Some(st) = &s.strategy {
                st.parse::<datapunk_lb_core::StrategyKind>()
                    .map_err(|e| format!("services.{svc}.strategy: {e}"))?;
            }
        }
        Ok(())
    }

    /// Writes the state atomically to `path`.
    pub(crate) fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        let json = self.to_json().map_err(|e| io(std::io::Error::other(e)))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The service's entry, created if missing.
    pub(crate) fn service_mut(&mut self, name: &str) -> &mut ServiceState {
        self.services.entry(name.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_moves_corrupt_files_aside() {
        let dir = std::env::temp_dir().join(format!("dplb-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let mut s = DynamicState::default();
        s.service_mut("api").instances.insert(
            "x".into(),
            InstanceSpec {
                address: "127.0.0.1".into(),
                port: 9,
                weight: 3,
                zone: None,
                tags: vec![],
            },
        );
        s.save(&path).unwrap();
        let back = DynamicState::load(&path).unwrap();
        assert_eq!(back.services["api"].instances["x"].weight, 3);

        std::fs::write(&path, "{ not json").unwrap();
        match DynamicState::load(&path) {
            Err(StateError::Corrupt { moved_to, .. }) => {
                assert!(moved_to.exists(), "the corrupt file is kept");
                assert!(!path.exists());
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
