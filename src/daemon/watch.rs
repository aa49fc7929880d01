//! File-change wake-ups for the output followers: one inotify instance for the whole daemon (the per-user limit
//! on instances is small), a map from watch to the follower's `Notify`. Idle runs cost nothing: no event, no work.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// After handling a batch of events the dispatcher pauses this long, so that a child doing one write(2) per line
/// costs a bounded number of wake-ups: the kernel merges repeated events for a file while nobody reads them. The
/// first write after a quiet spell is still seen at once.
const COALESCE: Duration = Duration::from_millis(10);

pub struct Watcher {
    watches: Mutex<Watches>,
    targets: Arc<Mutex<HashMap<WatchDescriptor, Arc<Notify>>>>,
}

impl Watcher {
    /// Creates the inotify instance and starts the task that dispatches its events.
    pub fn start() -> io::Result<Watcher> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let targets: Arc<Mutex<HashMap<WatchDescriptor, Arc<Notify>>>> = Arc::default();
        // SAFETY: the Inotify is moved into the AsyncFd, which owns its fd (open, unchanged) until dropped.
        let fd = unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }?;
        tokio::spawn(dispatch(fd, targets.clone()));
        Ok(Watcher { watches: Mutex::new(watches), targets })
    }

    /// Wakes `notify` whenever `path` is written to.
    pub fn watch(&self, path: &Path, notify: Arc<Notify>) -> io::Result<WatchDescriptor> {
        let wd = self.watches.lock().unwrap_or_else(|e| e.into_inner()).add(path, WatchMask::MODIFY)?;
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).insert(wd.clone(), notify);
        Ok(wd)
    }

    pub fn unwatch(&self, wd: WatchDescriptor) {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).remove(&wd);
        // The file may be gone already (then the kernel dropped the watch itself).
        let _ = self.watches.lock().unwrap_or_else(|e| e.into_inner()).remove(wd);
    }
}

async fn dispatch(mut fd: AsyncFd<Inotify>, targets: Arc<Mutex<HashMap<WatchDescriptor, Arc<Notify>>>>) {
    let mut buf = [0u8; 4096];
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let woken: Result<Vec<Arc<Notify>>, io::Error> = match guard.try_io(|inner| {
            let events = inner.get_mut().read_events(&mut buf)?;
            let targets = targets.lock().unwrap_or_else(|e| e.into_inner());
            let mut woken = Vec::new();
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    // Events were lost: wake everyone, a follower that finds nothing new just goes back to sleep.
                    woken.extend(targets.values().cloned());
                } else if let Some(n) = targets.get(&event.wd) {
                    woken.push(n.clone());
                }
            }
            Ok(woken)
        }) {
            Ok(result) => result,
            Err(_would_block) => continue,
        };
        match woken {
            Ok(list) => {
                list.iter().for_each(|n| n.notify_one());
                tokio::time::sleep(COALESCE).await;
            }
            Err(e) => {
                tracing::error!("inotify read failed, output previews stop updating until restart: {e}");
                return;
            }
        }
    }
}
