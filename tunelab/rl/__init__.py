"""Reinforcement learning from feedback: rollouts, rewards, advantages, reward models, the online loop."""
