//! A `Read` over byte buffers arriving on a channel: how a producer thread
//! (input hashing, prefix rebuilding) hands a stream to a consumer that wants
//! to read it like a file.

use crossbeam_channel::Receiver;
use std::io::Read;

pub struct ChannelReader<E> {
    rx: Receiver<Result<Vec<u8>, E>>,
    cur: Vec<u8>,
    pos: usize,
}

impl<E> ChannelReader<E> {
    /// The stream ends when the sender is dropped; an `Err` item is returned
    /// by the read that reaches it.
    pub fn new(rx: Receiver<Result<Vec<u8>, E>>) -> Self {
        ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl<E: Into<std::io::Error>> Read for ChannelReader<E> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.cur = b;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Ok(0),
            }
        }
        let n = (self.cur.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
