"""The run side: the mmprompt command, its Lightning stages and run folders."""
