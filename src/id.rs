//! The one name every layer uses for a connection: its slab key in the connection table,
//! which is also its mio `Token` and its index in the reactor's socket list. A leaf, so
//! that the hub can name subscribers without knowing what a connection is.

use mio::Token;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

impl ConnId {
    pub fn token(self) -> Token {
        Token(self.0)
    }
}
