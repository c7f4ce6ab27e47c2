"""Chat front ends (Telegram, Discord, local web chat): thin translators onto the bot core."""
