//! What this host offers the engine at run time, beyond sysfs: the shared libraries it loads
//! (libibverbs through the verbs layer, libcuda). Used by `kvtransfer doctor`; nothing here
//! changes state.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// What opening the verbs library (libibverbs, loaded at run time) gives on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerbsLibrary {
    /// Loaded, and the kernel answered with this many RDMA devices.
    Usable {
        /// Devices `ibv_get_device_list` returned.
        devices: usize,
    },
    /// Loaded, but the kernel has no RDMA support (`ibv_get_device_list` answered ENOSYS).
    KernelMissing,
    /// `libibverbs.so.1` could not be loaded: rdma-core is not installed.
    Missing,
    /// Loaded, but listing devices failed otherwise.
    Failed(String),
}

impl VerbsLibrary {
    /// Whether libibverbs itself was loaded.
    pub fn loaded(&self) -> bool {
        !matches!(self, VerbsLibrary::Missing)
    }
}

/// Loads libibverbs the way the engine does and lists the devices, telling the reasons apart.
pub fn verbs_library() -> VerbsLibrary {
    match crate::transport::rdma::verbs::device_list() {
        Ok(list) => VerbsLibrary::Usable {
            devices: list.len(),
        },
        Err(Error::RdmaCoreMissing) => VerbsLibrary::Missing,
        Err(Error::RdmaKernelMissing) => VerbsLibrary::KernelMissing,
        Err(e) => VerbsLibrary::Failed(e.to_string()),
    }
}

/// Directories the dynamic loader searches when nothing else names the library.
const DEFAULT_LIBRARY_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Where the dynamic loader would find the shared library `name` (`libcuda.so.1`), without
/// loading it: `LD_LIBRARY_PATH`, then the paths `/etc/ld.so.cache` lists, then the default
/// directories. `None` when it is nowhere.
pub fn find_library(name: &str) -> Option<PathBuf> {
    let from_env = env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let env_dirs = from_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name));
    let cached = fs::read("/etc/ld.so.cache")
        .map(|bytes| cached_paths(&bytes, name))
        .unwrap_or_default();
    let defaults = DEFAULT_LIBRARY_DIRS.iter().map(|d| Path::new(d).join(name));
    env_dirs.chain(cached).chain(defaults).find(|p| p.is_file())
}

/// The absolute paths in an `ld.so.cache` image whose file name is `name`.
fn cached_paths(cache: &[u8], name: &str) -> Vec<PathBuf> {
    cache
        .split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter(|s| s.starts_with('/') && Path::new(s).file_name().is_some_and(|f| f == name))
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_are_picked_out_by_file_name() {
        let image =
            b"glibc-ld.so.cache1.1\0\0libcuda.so.1\0/usr/lib/x86_64-linux-gnu/libcuda.so.1\0\
libcuda.so.10\0/opt/x/libcuda.so.10\0/lib/libcuda.so.1.bak\0\xff\xfe\0";
        assert_eq!(
            cached_paths(image, "libcuda.so.1"),
            [PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1")]
        );
        assert!(cached_paths(image, "libibverbs.so.1").is_empty());
    }

    #[test]
    fn a_library_that_is_nowhere_is_not_found() {
        assert_eq!(find_library("libkvtransfer-no-such-library.so.7"), None);
        // libc is where the loader finds it on every Linux host this runs on.
        assert!(find_library("libc.so.6").is_some());
    }
}
