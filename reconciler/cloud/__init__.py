"""The cloud: instances and the platform API of each metro, and how the metros are reached."""
