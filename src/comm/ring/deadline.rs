//! Every collective call ends by a deadline. Socket timeouts bound each read and write, but a
//! peer that trickles one byte just inside the timeout would keep a call going for ever; so a
//! call also has a deadline of [`CALL_DEADLINE_TIMEOUTS`] × the timeout, and each I/O waits at
//! most what is left of it.

use super::*;

/// A call's deadline, in socket timeouts: generous for a large buffer on a slow link, and
/// still an end.
pub(super) const CALL_DEADLINE_TIMEOUTS: u32 = 4;

impl Link {
    /// Starts a call's clock: the deadline is set and both sockets wait the full timeout again.
    pub(super) fn start_clock(&mut self) -> io::Result<()> {
        self.deadline = Instant::now() + self.timeout * CALL_DEADLINE_TIMEOUTS;
        self.send.set_write_timeout(Some(self.timeout))?;
        self.recv.set_read_timeout(Some(self.timeout))
    }

    /// Before one read or write: fails past the deadline, and shortens the socket's timeout to
    /// what is left once that is less than a timeout (only near the end: no syscall otherwise).
    fn arm(&self, s: &Stream, read: bool) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.deadline_passed());
        }
        if left < self.timeout {
            if read {
                s.set_read_timeout(Some(left))?;
            } else {
                s.set_write_timeout(Some(left))?;
            }
        }
        Ok(())
    }

    /// `read_exact` from the previous rank, within the call's deadline.
    pub(super) fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.arm(&self.recv, true)?;
            match (&self.recv).read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.past_deadline(e)),
            }
        }
        Ok(())
    }

    /// `write_all` to the next rank, within the call's deadline.
    pub(super) fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            self.arm(&self.send, false)?;
            match (&self.send).write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.past_deadline(e)),
            }
        }
        Ok(())
    }

    /// A timeout that the deadline shortened is the deadline's doing: say so.
    fn past_deadline(&self, e: io::Error) -> io::Error {
        let timed_out = matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        );
        if timed_out && Instant::now() >= self.deadline {
            return self.deadline_passed();
        }
        e
    }

    fn deadline_passed(&self) -> io::Error {
        io::Error::other(format!(
            "the call did not finish within its deadline ({} = {CALL_DEADLINE_TIMEOUTS} × the \
             timeout): a peer is sending or reading too slowly",
            secs(self.timeout * CALL_DEADLINE_TIMEOUTS)
        ))
    }
}
