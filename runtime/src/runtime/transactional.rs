//! Starting a saga inside the caller's own database transaction (issue 15, section 3):
//! being written.
