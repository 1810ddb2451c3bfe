//! Shared helpers of the example programs (echo driver, agentctl, fleet demo).
