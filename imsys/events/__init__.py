"""The events domain: one-time passwords and delivery channels an operator can stop.

Its public surface, for other domains: the channel switch (a sender checks
``ChannelControl.ensure_running`` first, so a stopped channel holds its messages).
"""

from imsys.events.channels import CHANNELS, Channel, ChannelControl

__all__ = ["CHANNELS", "Channel", "ChannelControl"]
