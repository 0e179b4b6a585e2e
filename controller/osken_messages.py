"""Rules (flows.py) to and from os-ken OpenFlow 1.3 messages; the only module that knows os-ken's classes."""

from __future__ import annotations

from controller.flows import Action, Delete, Rule


def flow_mod(dp, rule: Rule):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    actions = [_action(dp, a) for a in rule.actions]
    instructions = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)] if actions else []
    return parser.OFPFlowMod(
        dp, cookie=rule.cookie, command=ofp.OFPFC_ADD, idle_timeout=rule.idle_timeout, priority=rule.priority,
        buffer_id=ofp.OFP_NO_BUFFER, flags=ofp.OFPFF_SEND_FLOW_REM if rule.notify_removed else 0,
        match=parser.OFPMatch(**rule.match), instructions=instructions,
    )


def flow_delete(dp, delete: Delete):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    strict = delete.priority is not None
    return parser.OFPFlowMod(
        dp, cookie=delete.cookie, cookie_mask=delete.cookie_mask,
        command=ofp.OFPFC_DELETE_STRICT if strict else ofp.OFPFC_DELETE,
        priority=delete.priority or 0, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
        match=parser.OFPMatch(**delete.match),
    )


def message(dp, item: Rule | Delete):
    return flow_mod(dp, item) if isinstance(item, Rule) else flow_delete(dp, item)


def _action(dp, action: Action):
    ofp, parser = dp.ofproto, dp.ofproto_parser
    kind = action[0]
    if kind == "output":
        return parser.OFPActionOutput(action[1])
    if kind == "in_port":
        return parser.OFPActionOutput(ofp.OFPP_IN_PORT)
    if kind == "normal":
        return parser.OFPActionOutput(ofp.OFPP_NORMAL)
    if kind == "controller":
        return parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)
    if kind == "set":
        return parser.OFPActionSetField(**{action[1]: action[2]})
    if kind == "move":
        return parser.NXActionRegMove(src_field=action[1], dst_field=action[2], n_bits=action[3])
    raise ValueError(f"unknown action {action!r}")


def match_dict(match) -> dict:
    return {name: value for name, value in match.items()}


def actions_of(instructions) -> tuple[Action, ...]:
    """The subset of actions a restarted controller needs to read back (set-field, output)."""
    out: list[Action] = []
    for inst in instructions:
        for act in getattr(inst, "actions", []):
            if act.__class__.__name__ == "OFPActionSetField":
                out.append(("set", act.key, act.value))
            elif act.__class__.__name__ == "OFPActionOutput":
                out.append(("output", act.port))
    return tuple(out)
