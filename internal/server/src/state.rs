//! Shared server state.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rm_assets::AssetStore;
use rm_assets::store::StoreError;

use crate::PublicUrl;

/// What the server needs to start, independent of how it was parsed.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub bundled_dir: PathBuf,
    pub public_url: Option<PublicUrl>,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: AssetStore,
    public_url: Option<PublicUrl>,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Checks the directories (see [`AssetStore::new`]) and builds the state.
    pub fn new(config: Config) -> Result<AppState, StoreError> {
        let store = AssetStore::new(&config.data_dir, &config.bundled_dir)?;
        Ok(AppState {
            inner: Arc::new(Inner { store, public_url: config.public_url, shutting_down: AtomicBool::new(false) }),
        })
    }

    pub fn store(&self) -> &AssetStore {
        &self.inner.store
    }

    pub fn public_url(&self) -> Option<&PublicUrl> {
        self.inner.public_url.as_ref()
    }

    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}
