"""Rules and groups (flows.py) to and from os-ken OpenFlow 1.3 messages; the only module that knows os-ken's classes.

Reading back is the exact inverse for every action flows.py uses, so a restarted app
compares what the switch holds with what the table wants rule by rule.
"""

from __future__ import annotations

from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser

from controller.flows import Action, Change, Delete, Group, GroupMod, Rule

NX_CT_F_COMMIT = 1
NX_NAT_F_DST = 2
CT_MARK_PORT_BITS = 16  # ct_mark[0..15] holds the client's in_port


class _PaddedNAT(ofproto_v1_3_parser.NXActionNAT):
    """os-ken's nat(dst=IP:PORT) is 28 bytes but says 32, and NXActionCT nests it unpadded: pad it here."""

    def serialize(self, buf, offset):
        super().serialize(buf, offset)
        buf += bytes(self.len - (len(buf) - offset))


def flow_mod(dp, rule: Rule):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    return parser.OFPFlowMod(
        dp, table_id=rule.table, cookie=rule.cookie, command=ofp.OFPFC_ADD, priority=rule.priority,
        buffer_id=ofp.OFP_NO_BUFFER, match=parser.OFPMatch(**rule.match), instructions=_instructions(dp, rule.actions),
    )


def flow_delete(dp, delete: Delete):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    strict = delete.table is not None
    return parser.OFPFlowMod(
        dp, cookie=delete.cookie, cookie_mask=delete.cookie_mask,
        table_id=delete.table if strict else ofp.OFPTT_ALL,
        command=ofp.OFPFC_DELETE_STRICT if strict else ofp.OFPFC_DELETE,
        priority=delete.priority, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        match=parser.OFPMatch(**dict(delete.match)),
    )


def group_mod(dp, mod: GroupMod):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    command = {"add": ofp.OFPGC_ADD, "modify": ofp.OFPGC_MODIFY, "delete": ofp.OFPGC_DELETE}[mod.command]
    buckets = [] if mod.command == "delete" else [
        parser.OFPBucket(weight=100, watch_port=ofp.OFPP_ANY, watch_group=ofp.OFPG_ANY,
                         actions=[_action(dp, a) for a in bucket]) for bucket in mod.group.buckets]
    return parser.OFPGroupMod(dp, command=command, type_=ofp.OFPGT_SELECT, group_id=mod.group.group_id,
                              buckets=buckets)


def message(dp, change: Change):
    if isinstance(change, Rule):
        return flow_mod(dp, change)
    if isinstance(change, GroupMod):
        return group_mod(dp, change)
    return flow_delete(dp, change)


def _instructions(dp, actions: tuple[Action, ...]) -> list:
    ofp, parser = dp.ofproto, dp.ofproto_parser
    apply = [_action(dp, a) for a in actions if a[0] != "goto"]
    out = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, apply)] if apply else []
    out += [parser.OFPInstructionGotoTable(a[1]) for a in actions if a[0] == "goto"]
    return out


def _action(dp, action: Action):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    kind = action[0]
    if kind == "output":
        return parser.OFPActionOutput(action[1])
    if kind == "in_port":
        return parser.OFPActionOutput(ofp.OFPP_IN_PORT)
    if kind == "normal":
        return parser.OFPActionOutput(ofp.OFPP_NORMAL)
    if kind == "set":
        return parser.OFPActionSetField(**{action[1]: action[2]})
    if kind == "move":
        return parser.NXActionRegMove(src_field=action[1], dst_field=action[2], n_bits=action[3])
    if kind == "group":
        return parser.OFPActionGroup(action[1])
    if kind == "output_ct_mark":
        return parser.NXActionOutputReg(ofs_nbits=CT_MARK_PORT_BITS - 1, src="ct_mark", max_len=0)
    if kind == "ct":
        _, zone, table = action
        return parser.NXActionCT(flags=0, zone_src="", zone_ofs_nbits=zone, recirc_table=table, alg=0,
                                 actions=[parser.NXActionNAT(flags=0)])
    if kind == "ct_dnat":
        _, zone, table, ip, port = action
        nat = _PaddedNAT(flags=NX_NAT_F_DST, range_ipv4_min=ip, range_ipv4_max=ip,
                         range_proto_min=port, range_proto_max=port)
        mark = parser.NXActionRegMove(src_field="in_port", dst_field="ct_mark", n_bits=CT_MARK_PORT_BITS)
        return parser.NXActionCT(flags=NX_CT_F_COMMIT, zone_src="", zone_ofs_nbits=zone, recirc_table=table, alg=0,
                                 actions=[nat, mark])
    raise ValueError(f"unknown action {action!r}")


# ---- reading back (flow stats, group descriptions) ---------------------------------------

def match_dict(match) -> dict:
    return {name: value for name, value in match.items()}


def rule_of(stat) -> Rule:
    """A flow-stats entry as a Rule."""
    return Rule(stat.table_id, stat.priority, match_dict(stat.match), actions_of(stat.instructions), stat.cookie)


def group_of(desc) -> Group:
    """A group-description entry as a Group."""
    return Group(desc.group_id, tuple(_read_actions(b.actions) for b in desc.buckets))


def actions_of(instructions) -> tuple[Action, ...]:
    out: list[Action] = []
    gotos: list[Action] = []
    for inst in instructions:
        if inst.__class__.__name__ == "OFPInstructionGotoTable":
            gotos.append(("goto", inst.table_id))
        else:
            out += _read_actions(getattr(inst, "actions", []))
    return tuple(out + gotos)


def _read_actions(actions) -> tuple[Action, ...]:
    return tuple(_read_action(a) for a in actions)


def _read_action(act) -> Action:
    ofp = ofproto_v1_3
    name = act.__class__.__name__
    if name == "OFPActionOutput":
        return {ofp.OFPP_IN_PORT: ("in_port",), ofp.OFPP_NORMAL: ("normal",)}.get(act.port, ("output", act.port))
    if name == "OFPActionSetField":
        return ("set", act.key, act.value)
    if name == "NXActionRegMove":  # OVS answers with the NXM names of OXM fields (eth_src_nxm)
        return ("move", act.src_field.removesuffix("_nxm"), act.dst_field.removesuffix("_nxm"), act.n_bits)
    if name == "OFPActionGroup":
        return ("group", act.group_id)
    if name in ("NXActionOutputReg", "NXActionOutputReg2") and act.src == "ct_mark":
        return ("output_ct_mark",)
    if name == "NXActionCT":
        return _read_ct(act)
    return ("unknown", name)  # never equal to what we want: a restarted app replaces the rule


def _read_ct(act) -> Action:
    nat = next((a for a in act.actions if a.__class__.__name__ == "NXActionNAT"), None)
    if not act.flags & NX_CT_F_COMMIT:
        return ("ct", act.zone_ofs_nbits, act.recirc_table) if nat is not None and not nat.flags else ("unknown", "ct")
    marks = any(a.__class__.__name__ == "NXActionRegMove" and (a.src_field, a.dst_field, a.n_bits)
                == ("in_port", "ct_mark", CT_MARK_PORT_BITS) for a in act.actions)
    if nat is None or not nat.flags & NX_NAT_F_DST or not marks:
        return ("unknown", "ct commit")
    return ("ct_dnat", act.zone_ofs_nbits, act.recirc_table, nat.range_ipv4_min, nat.range_proto_min)
