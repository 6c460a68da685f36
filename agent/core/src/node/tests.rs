//! Node behaviour tests.
