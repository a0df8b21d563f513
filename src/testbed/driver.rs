//! The traffic driver: production-shaped load (see the module docs once written).
