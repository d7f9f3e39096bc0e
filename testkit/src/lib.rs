//! meshgate-testkit
