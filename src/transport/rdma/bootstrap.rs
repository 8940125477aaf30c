//! The RDMA bootstrap over the engine's TCP handshake, both sides of it. The initiator
//! [offers](Offer) fresh QPs in the hello of its control connection; the target
//! [answers](answer) with QPs of its own, connected to them; the initiator connects its QPs
//! to the answer and [finishes](Answered::finish) the link. The engine only carries the
//! endpoint each side puts in its hello: it knows nothing of QPs.

use std::sync::Arc;

use super::link::PreparedLanes;
use super::{AcceptedQps, RdmaLink, RdmaTransport};
use crate::error::Result;
use crate::transport::PeerLink;
use crate::wire::{Endpoint, Hello, RdmaEndpoint, TransportId};

/// The RDMA endpoint a hello carries, if any.
fn endpoint_in(h: &Hello) -> Result<Option<RdmaEndpoint>> {
    match h
        .endpoints
        .iter()
        .find(|e| e.transport == TransportId::Rdma)
    {
        Some(e) => Ok(Some(RdmaEndpoint::decode(&e.data)?)),
        None => Ok(None),
    }
}

fn wire(e: &RdmaEndpoint) -> Endpoint {
    Endpoint {
        transport: TransportId::Rdma,
        data: e.encode(),
    }
}

/// QPs created for a peer and offered in our hello, waiting for its answer.
pub(crate) struct Offer {
    transport: Arc<RdmaTransport>,
    lanes: PreparedLanes,
    endpoint: Endpoint,
}

impl Offer {
    /// Creates `per_rail` QPs on every rail of `t`.
    pub(crate) fn new(t: &Arc<RdmaTransport>, per_rail: usize) -> Result<Offer> {
        let (lanes, endpoint) = RdmaLink::prepare(t, per_rail)?;
        Ok(Offer {
            transport: t.clone(),
            lanes,
            endpoint: wire(&endpoint),
        })
    }

    /// Creates one QP on each of `rails` (local rail indices), to replace lanes whose rail
    /// failed and came back.
    pub(crate) fn on_rails(t: &Arc<RdmaTransport>, rails: &[usize]) -> Result<Offer> {
        let (lanes, endpoint) = RdmaLink::prepare_on(t, rails)?;
        Ok(Offer {
            transport: t.clone(),
            lanes,
            endpoint: wire(&endpoint),
        })
    }

    /// What goes into our hello.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Reads the peer's hello: `Some` when it answered over RDMA, `None` when it offers
    /// none (a target without RDMA; the offered QPs go).
    pub(crate) fn answered(self, theirs: &Hello) -> Result<Option<Answered>> {
        Ok(endpoint_in(theirs)?.map(|answer| Answered {
            offer: self,
            answer,
        }))
    }
}

/// An offer the peer answered over RDMA.
pub(crate) struct Answered {
    offer: Offer,
    answer: RdmaEndpoint,
}

impl Answered {
    /// Connects the offered QPs to the answer; `control` (a one-lane link of another
    /// transport on the same handshake) carries segment refreshes, liveness and staging.
    pub(crate) fn finish(self, control: Box<dyn PeerLink>) -> Result<RdmaLink> {
        let Answered { offer, answer } = self;
        RdmaLink::finish(&offer.transport, offer.lanes, &answer, control)
    }
}

impl Answered {
    /// Connects the offered QPs to the answer as lanes, attached to their rail workers.
    pub(super) fn into_lanes(self) -> Result<Vec<Arc<super::link::Lane>>> {
        let Answered { offer, answer } = self;
        RdmaLink::connect_lanes(&offer.transport, offer.lanes, &answer)
    }
}

/// Target side: answers the RDMA offer in a control connection's hello, if it carries one.
/// Returns what goes into our hello and the accepted QPs, which live as long as that handle
/// (the control connection keeps it).
pub(crate) fn answer(
    t: &Arc<RdmaTransport>,
    theirs: &Hello,
) -> Result<Option<(Endpoint, AcceptedQps)>> {
    let Some(offer) = endpoint_in(theirs)? else {
        return Ok(None);
    };
    let (answer, qps) = t.accept(&offer, theirs.engine_id, theirs.epoch, theirs.token)?;
    Ok(Some((wire(&answer), qps)))
}
