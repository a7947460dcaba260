//! Start requests over the bus, from services in any language (issue 15, section 3):
//! being written.
