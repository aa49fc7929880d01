//! Who is connected to the control socket, so no client can wedge it: at most `supervisor.maxClients` request
//! connections (at the cap the longest-idle one is closed, so a new `status` always gets through), streaming ones
//! (`logs -f`) counted apart with their own cap, and one budget for the bytes of all unfinished requests (past it,
//! the largest stalled one is dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

/// What all unfinished requests together may hold.
pub const BUFFER_BUDGET: usize = 16 << 20;

/// The connections of the control socket.
pub struct Clients {
    max_requests: usize,
    max_streams: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    connections: HashMap<u64, Connection>,
    /// Bytes of unfinished requests, all connections together.
    buffered: usize,
}

struct Connection {
    kind: Kind,
    /// Waiting for (the rest of) a request since then; `None` while a request is being answered.
    waiting_since: Option<Instant>,
    buffered: usize,
    /// Told to close; the connection says why to its client.
    close: Arc<Notify>,
    why: Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Stream,
}

impl Clients {
    pub fn new(max_requests: usize, max_streams: usize) -> Clients {
        Clients { max_requests: max_requests.max(1), max_streams, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new request connection. At the cap the longest-idle request connection is closed to make room;
    /// when every one is busy answering, the new one is refused (`None`).
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut inner = self.lock();
        let requests = inner.connections.values().filter(|c| c.kind == Kind::Request).count();
        if requests >= self.max_requests {
            let idlest = inner
                .connections
                .iter_mut()
                .filter(|(_, c)| c.kind == Kind::Request && c.why.is_none())
                .filter_map(|(id, c)| Some((*id, c.waiting_since?)))
                .min_by_key(|(_, since)| *since)
                .map(|(id, _)| id)?;
            inner.close(idlest, "closed to make room for a new client (supervisor.maxClients)");
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let close = Arc::new(Notify::new());
        let connection = Connection {
            kind: Kind::Request,
            waiting_since: Some(Instant::now()),
            buffered: 0,
            close: close.clone(),
            why: None,
        };
        inner.connections.insert(id, connection);
        Some(Admitted { clients: self.clone(), id, close })
    }
}

impl Inner {
    fn close(&mut self, id: u64, why: &'static str) {
        if let Some(c) = self.connections.get_mut(&id) {
            c.why = Some(why);
            c.close.notify_one();
        }
    }
}

/// One admitted connection; leaves the registry when dropped.
pub struct Admitted {
    clients: Arc<Clients>,
    id: u64,
    close: Arc<Notify>,
}

impl Admitted {
    /// Resolves when the daemon closes this connection; says why.
    pub async fn closed(&self) -> &'static str {
        self.close.notified().await;
        self.clients.lock().connections.get(&self.id).and_then(|c| c.why).unwrap_or("closed by autodevd")
    }

    /// Waiting for the next request (idle, or stalled in one).
    pub fn waiting(&self) {
        if let Some(c) = self.clients.lock().connections.get_mut(&self.id) {
            c.waiting_since = Some(Instant::now());
        }
    }

    /// A whole request arrived: it is answered now, and its bytes no longer count as unfinished.
    pub fn answering(&self) {
        let mut inner = self.clients.lock();
        let freed = inner.connections.get_mut(&self.id).map_or(0, |c| {
            c.waiting_since = None;
            std::mem::take(&mut c.buffered)
        });
        inner.buffered -= freed;
    }

    /// `n` more bytes of an unfinished request arrived. Past the budget the largest stalled request is dropped; if
    /// that is this one, the answer is `Err` with the reason. A dropped request's bytes count until its connection
    /// is gone (that is when they are freed), but never make another one go.
    pub fn buffered(&self, n: usize) -> Result<(), &'static str> {
        const WHY: &str = "dropped: unfinished requests of all clients hold too much memory";
        let mut inner = self.clients.lock();
        inner.buffered += n;
        if let Some(c) = inner.connections.get_mut(&self.id) {
            c.buffered += n;
        }
        loop {
            let going: usize = inner.connections.values().filter(|c| c.why.is_some()).map(|c| c.buffered).sum();
            if inner.buffered - going <= BUFFER_BUDGET {
                return Ok(());
            }
            let largest = inner
                .connections
                .iter()
                .filter(|(_, c)| c.buffered > 0 && c.why.is_none())
                .max_by_key(|(_, c)| c.buffered)
                .map(|(id, _)| *id);
            let Some(largest) = largest else { return Ok(()) };
            inner.close(largest, WHY);
            if largest == self.id {
                return Err(WHY);
            }
        }
    }

    /// Turns this connection into a stream (`logs -f`), which idle rules do not touch; refused at the streams' cap.
    pub fn to_stream(&self) -> Result<(), String> {
        let max = self.clients.max_streams;
        let mut inner = self.clients.lock();
        let streams = inner.connections.values().filter(|c| c.kind == Kind::Stream).count();
        if streams >= max {
            return Err(format!("{streams} clients follow logs already, the most autodevd serves at once"));
        }
        if let Some(c) = inner.connections.get_mut(&self.id) {
            c.kind = Kind::Stream;
        }
        Ok(())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = self.clients.lock();
        if let Some(c) = inner.connections.remove(&self.id) {
            inner.buffered -= c.buffered;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_request_connection_makes_room() {
        let clients = Arc::new(Clients::new(2, 1));
        let first = clients.admit().unwrap();
        let second = clients.admit().unwrap();
        second.waiting();
        let _third = clients.admit().expect("room is made");
        let inner = clients.lock();
        assert_eq!(inner.connections[&first.id].why.map(|w| w.contains("make room")), Some(true));
        assert!(inner.connections[&second.id].why.is_none());
    }

    #[test]
    fn busy_connections_are_never_closed_to_make_room() {
        let clients = Arc::new(Clients::new(1, 1));
        let busy = clients.admit().unwrap();
        busy.answering();
        assert!(clients.admit().is_none());
    }

    #[test]
    fn past_the_budget_the_largest_stalled_request_goes() {
        let clients = Arc::new(Clients::new(8, 1));
        let big = clients.admit().unwrap();
        let small = clients.admit().unwrap();
        big.buffered(BUFFER_BUDGET - 10).unwrap();
        small.buffered(5).unwrap();
        // The small one tips the budget; the big one is dropped, the small one goes on.
        small.buffered(20).unwrap();
        assert!(clients.lock().connections[&big.id].why.is_some());
        // The big one's bytes count until it is gone, but make no one else go.
        small.buffered(1000).unwrap();
        drop(big);
        assert_eq!(clients.lock().buffered, 1025);
    }

    #[test]
    fn streams_have_their_own_cap() {
        let clients = Arc::new(Clients::new(1, 1));
        let a = clients.admit().unwrap();
        a.to_stream().unwrap();
        // The stream does not count against request connections.
        let b = clients.admit().unwrap();
        assert!(b.to_stream().is_err());
    }
}
